"""The Helm chart: lint, render with the defaults and with every option on, validate every
manifest against the Kubernetes schemas, the values schema's refusals, and the rendered
container command started for real against a tiny model."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "loramux"
FULL = ROOT / "tests" / "helm" / "full-values.yaml"
BIN = Path(sys.executable).parent
HELM = BIN / "helm"  # installed by the Makefile (scripts/install_helm.py)


def helm(*args, check=True) -> subprocess.CompletedProcess:
    assert HELM.exists(), "helm is missing: `make install` puts it in .venv/bin"
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check)


def render(*args) -> list[dict]:
    out = helm("template", "r1", str(CHART), *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_template(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]


def validate(docs: list[dict], tmp_path: Path) -> str:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.33.0", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(FULL)]], ids=["defaults", "full"])
def test_lint_render_and_validate(values, tmp_path):
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), *values).stdout
    docs = render(*values)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    report = validate([d for d in docs if d["apiVersion"] != "monitoring.coreos.com/v1"], tmp_path)
    assert "failed" not in report
    if not values:
        assert kinds == ["ConfigMap/r1-loramux", "Deployment/r1-loramux", "Pod/r1-loramux-test", "PodDisruptionBudget/r1-loramux",
                         "Secret/r1-loramux-keys", "Service/r1-loramux", "Service/r1-loramux-headless",
                         "ServiceAccount/r1-loramux"]
    else:
        assert kinds == ["ConfigMap/r1-loramux", "ConfigMap/r1-loramux-dashboard", "Deployment/r1-loramux",
                         "HorizontalPodAutoscaler/r1-loramux",
                         "NetworkPolicy/r1-loramux",
                         "Pod/r1-loramux-test", "PodDisruptionBudget/r1-loramux", "Service/r1-loramux",
                         "Service/r1-loramux-headless", "ServiceAccount/r1-loramux", "ServiceMonitor/r1-loramux"]
        monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
        assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]["ingress"]
        assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "r1",
                                                "app.kubernetes.io/component": "helm-test"}}} in policy[0]["from"]
        assert policy[1] == {"ports": [{"port": 9464, "protocol": "TCP"}],  # the metrics port: the scraper only
                             "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}
        hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
        assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {"metric": {"name": "loramux_queue_depth"},
                                                                   "target": {"type": "AverageValue", "averageValue": "6"}}}]
        args = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.args"].split("\n")
        for flag, value in (("--registry", "s3://models/loramux"), ("--object-root", "s3://models/adapters"),
                            ("--object-endpoint-url", "http://minio:9000"), ("--kv-cache", "static"),
                            ("--kv-cache-tokens", "8192")):
            assert args[args.index(flag) + 1] == value
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["terminationGracePeriodSeconds"] == 30  # the server's 20 s drain and 10 s more
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    annotations = pod_template(docs)["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64  # pods roll when the settings change
    if values:  # TLS on: the probes use the plaintext health port
        args = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.args"].split("\n")
        assert "--tls-client-ca" in args and args[args.index("--health-port") + 1] == "8081"
        assert container["readinessProbe"]["grpc"] == container["livenessProbe"]["grpc"] == {"port": 8081}
        assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
        assert container["envFrom"] == [{"secretRef": {"name": "object-store-credentials"}}]
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in container["env"]
        assert {"name": "HF_HUB_ETAG_TIMEOUT", "value": "30"} in container["env"]
    else:
        assert container["readinessProbe"]["grpc"] == {"port": 50051}
        assert "--health-port" not in next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.args"]


@pytest.mark.parametrize("setting, message", [
    ("replicaCount=abc", "at '/replicaCount': got string, want integer"),
    ("server.bogus=1", "at '/server': additional properties 'bogus' not allowed"),
    ("model.dtype=float8", "at '/model/dtype'"),
    ("auth.mode=open", "at '/auth/mode'"),
    ("server.port=70000", "at '/server/port'"),
    ("store.registry=/local/dir", "at '/store/registry'"),
    ("autoscaling.metric=memory", "at '/autoscaling/metric'"),
    ("server.kvCache=paged", "at '/server/kvCache'"),
    ("server.kvCacheTokens=1", "at '/server/kvCacheTokens'"),
    ("tls.enabled=true", "at '/tls/secretName'"),  # TLS without its certificate's Secret
])
def test_values_schema_refuses(setting, message):
    result = helm("template", "r1", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_rendered_command_is_one_loramux_serve_accepts(assets, tmp_path):
    """The Deployment's command and arguments, run here: only the container's paths are mapped
    to local directories, and the addresses to loopback with free ports."""
    from loramux.server.tenancy.keys import append_key

    keys_source = tmp_path / "keys-src.yaml"
    append_key(keys_source, "team", "user")
    docs = render("--set", f"model.id={assets.base}", "--set", "merge.enabled=true", "--set", "http.enabled=true",
                  "--set-string", f"auth.keysFile={keys_source.read_text()}")
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    secret = next(d for d in docs if d["kind"] == "Secret")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    paths = {"/etc/loramux/keys": tmp_path / "keys", "/var/lib/loramux": tmp_path / "var", "/models": tmp_path / "models",
             "/adapters": assets.adapters, "/var/cache/loramux": tmp_path / "cache"}
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "keys.yaml").write_text(secret["stringData"]["keys.yaml"])
    assert container["args"] == ["@/etc/loramux/config/serve.args"]  # the ConfigMap's file, mounted there
    lines = config["data"]["serve.args"].rstrip("\n").split("\n")
    assert all(lines) and lines[:2] == ["--model", str(assets.base)]
    mapped = []
    for arg in lines:
        for inside, outside in paths.items():
            if arg == inside or arg.startswith(inside + "/"):
                arg = str(outside) + arg[len(inside):]
                break
        mapped.append(arg)
    for flag, local in (("--host", "127.0.0.1"), ("--metrics-host", "127.0.0.1"), ("--port", "0"), ("--metrics-port", "0")):
        mapped[mapped.index(flag) + 1] = local
    assert container["command"] == ["loramux", "serve"]
    (tmp_path / "serve.args").write_text("\n".join(mapped) + "\n")
    cmd = [sys.executable, "-m", "loramux.cli.main", "serve", f"@{tmp_path / 'serve.args'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        line = ""
        while "listening on" not in line:
            line = proc.stdout.readline()
            if (not line and proc.poll() is not None) or time.monotonic() > end:
                raise AssertionError(f"serve did not start: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "var" / "state").is_dir() and (tmp_path / "var" / "merges").is_dir()
    shutil.rmtree(tmp_path / "var")


def test_dockerfiles_lint_clean_and_match_the_charts_image_tags():
    files = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
    result = subprocess.run([str(BIN / "hadolint"), *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{values['image']['repository']}:{chart['appVersion']}-cuda"
    # Each Dockerfile names the tag it builds, non-root, with `loramux serve` as its entrypoint.
    for path, suffix in zip(files, ("cuda", "cpu")):
        text = path.read_text()
        assert f"Tag: <version>-{suffix}" in text and "USER 10001:10001" in text
        assert 'ENTRYPOINT ["loramux", "serve"]' in text


def test_the_values_reference_in_the_docs_is_generated_from_the_schema():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "values_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    schema = __import__("json").loads((CHART / "values.schema.json").read_text())

    def undescribed(node, path=""):
        for name, child in node.get("properties", {}).items():
            if not child.get("description"):
                yield path + name
            yield from undescribed(child, f"{path}{name}.")
    assert list(undescribed(schema)) == []


@pytest.mark.parametrize("mode", ["defaults", "tls+key", "mtls+key"])
def test_the_helm_test_pods_command_passes_against_a_server_on_loopback(assets, tmp_path, mode):
    """The rendered test pod's script and environment, run here against a real server with
    the same security: on the chart's defaults (keys, none given to the test: health only),
    with TLS and a key, and with mutual TLS and a key. Paths the pod mounts are mapped to
    files here; everything else is the rendered pod's."""
    import os

    from loramux.server.app import BackgroundServer
    from loramux.server.tenancy.keys import append_key
    from test_tls import issue, make_ca, pem

    ca = make_ca("chart test CA")
    files = {"ca.crt": pem(ca[1])}
    files["server.key"], files["server.crt"] = issue(ca, "localhost", server=True)
    files["client.key"], files["client.crt"] = issue(ca, "chart-test", server=False)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    keys_file = tmp_path / "keys.yaml"
    key = append_key(keys_file, "default", "user", "helm-test")
    values = []
    settings = dict(auth="keys", auth_keys_file=keys_file)
    if mode != "defaults":
        values += ["--set", "tls.enabled=true", "--set", "tls.secretName=server-tls", "--set", "testKeySecret=test-key"]
        settings.update(tls_cert=tmp_path / "server.crt", tls_key=tmp_path / "server.key", health_port=0)
    if mode == "mtls+key":
        values += ["--set", "tls.clientCaSecretName=client-ca", "--set", "testClientCertSecret=test-client"]
        settings.update(tls_client_ca=tmp_path / "ca.crt")
    pod = next(d for d in render(*values) if d["kind"] == "Pod")
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    mounted = {"/etc/loramux/tls/": tmp_path / "server-", "/etc/loramux/client-tls/": tmp_path / "client-"}
    if mode != "defaults":
        (tmp_path / "server-ca.crt").write_bytes(files["ca.crt"])
        (tmp_path / "client-tls.crt").write_bytes(files["client.crt"])
        (tmp_path / "client-tls.key").write_bytes(files["client.key"])
    with BackgroundServer(assets.settings(**settings)) as srv:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAMUX_")}
        for item in container["env"]:
            value = item.get("value")
            if "valueFrom" in item:  # the Secret's entry
                assert item["valueFrom"]["secretKeyRef"] == {"name": "test-key", "key": "api-key"}
                value = key
            elif item["name"] in ("LORAMUX_TARGET", "LORAMUX_HEALTH_TARGET"):
                port = int(value.rsplit(":", 1)[1])
                tls_name = mode != "defaults" and item["name"] == "LORAMUX_TARGET"  # the Service's full DNS name
                assert value.startswith("r1-loramux.default.svc:" if tls_name else "r1-loramux:"), value
                here = srv.running.health_port if port == 8081 else srv.running.port
                value = f"localhost:{here}"
            for prefix, local in mounted.items():
                if value.startswith(prefix):
                    value = f"{local}{value[len(prefix):]}"
            env[item["name"]] = value
        command = [sys.executable, *container["command"][1:]]  # the image's `python` is the one loramux is installed in
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "health: SERVING"
    if mode == "defaults":
        assert out[1] == "no testKeySecret: Generate not tried (it needs an API key)"
    else:
        expected = assets.oracle(None, "Hello", 4)
        reason = "stop_token" if expected[-1] == assets.tokenizer.eos_token_id else "length"
        assert out[1] == f"generate: {len(expected)} tokens ({reason})"


def test_the_images_install_the_suites_versions_and_can_compile(tmp_path):
    """No image is built here (no container builder runs without a daemon): the Dockerfiles
    install torch, then `.[all]` under docker/constraints.txt (the versions this suite passed
    with, scripts/constraints.py), which must satisfy pyproject.toml and resolve together, as a
    build would (pip's dry run); they carry a C compiler and point Triton's and inductor's
    caches at /tmp, which the chart mounts writable under a read-only root."""
    import re

    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "constraints.py"), "--check"], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    pins = dict(line.split("==") for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                          str(tmp_path / "report.json"), "-c", str(ROOT / "docker" / "constraints.txt"),
                          "torch==2.13.0", f"{ROOT}[all]"], capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr[-3000:]
    import json

    from packaging.utils import canonicalize_name

    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert {name: resolved.get(canonicalize_name(name)) for name in pins} == pins  # every pin, as pinned
    for dockerfile in (ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"):
        text = dockerfile.read_text()
        assert "pip install -c docker/constraints.txt '.[all]'" in text and "COPY docker/constraints.txt" in text
        assert re.search(r"apt-get install .*\bgcc=", text) and "TRITON_CACHE_DIR=/tmp/triton" in text
        assert "TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor" in text and "HOME=/tmp" in text
    pod = pod_template(render())["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
