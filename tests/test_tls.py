"""TLS and mutual TLS with certificates made here: the client SDK and the CLI against both, a
client certificate mapped to a tenant by the keys file, and the refusals."""

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import loramux.client as lc
from conftest import PROMPTS
from loramux.cli.main import main as cli
from loramux.server.app import BackgroundServer
from loramux.server.errors import InvalidSettings
from loramux.server.tenancy.keys import append_key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca, cn: str, server: bool):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("loramux test CA"), make_ca("someone else's CA")
    files = {"ca": pem(ca[1]), "other_ca": pem(other_ca[1])}
    files["server_key"], files["server_cert"] = issue(ca, "localhost", server=True)
    files["client_key"], files["client_cert"] = issue(ca, "billing-svc", server=False)
    files["stranger_key"], files["stranger_cert"] = issue(ca, "unlisted-svc", server=False)
    files["forged_key"], files["forged_cert"] = issue(other_ca, "billing-svc", server=False)
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    keys_file = root / "keys.yaml"
    admin = append_key(keys_file, "team-b", "admin", "b-admin")
    keys_file.write_text(keys_file.read_text() + "certificates:\n- {subject: billing-svc, tenant: team-b, role: user}\n")
    return files, paths, keys_file, admin


def test_tls_serves_the_sdk_and_the_cli_and_refuses_plaintext(assets, pki, capsys):
    files, paths, keys_file, admin = pki
    settings = assets.settings(auth="keys", auth_keys_file=keys_file, tls_cert=paths["server_cert"], tls_key=paths["server_key"],
                               health_port=0)
    with BackgroundServer(settings) as server:
        # The plaintext health port answers health checks (kubelet's gRPC probe speaks no TLS),
        # and nothing else: not the API, not reflection.
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{server.running.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            for service in ("", "loramux.v1.Loramux"):
                assert check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary("/loramux.v1.Loramux/ListAdapters")(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with lc.Client(server.target, api_key=admin, root_certificates=files["ca"]) as client:
            client.load_adapter("qv", source="qv-r4")
            assert client.generate(adapter_id="qv", prompt=PROMPTS[0], max_new_tokens=4).token_ids == assets.oracle("qv-r4", PROMPTS[0], 4)
        with lc.Client(server.target, api_key=admin, timeout=5) as plaintext:
            with pytest.raises(lc.Unavailable):
                plaintext.list_adapters()
        with lc.Client(server.target, api_key=admin, root_certificates=files["other_ca"], timeout=5) as untrusting:
            with pytest.raises(lc.Unavailable):  # the server's certificate is not signed by this CA
                untrusting.list_adapters()
        capsys.readouterr()
        assert cli(["adapters", "list", "--target", server.target, "--api-key", admin, "--tls-ca", str(paths["ca"])]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["qv", "4"]


def test_mutual_tls_maps_a_client_certificate_to_its_tenant(assets, pki, capsys):
    files, paths, keys_file, admin = pki
    settings = assets.settings(auth="keys", auth_keys_file=keys_file, tls_cert=paths["server_cert"],
                               tls_key=paths["server_key"], tls_client_ca=paths["ca"])
    with BackgroundServer(settings) as server:
        def client(cert: str | None, api_key=None):
            kwargs = {"root_certificates": files["ca"], "timeout": 5, "api_key": api_key}
            if cert:
                kwargs.update(certificate_chain=files[f"{cert}_cert"], private_key=files[f"{cert}_key"])
            return lc.Client(server.target, **kwargs)

        with client("client", api_key=admin) as c:  # a key decides when one is sent: team-b's admin
            c.load_adapter("billing", source="mlp-r2")
        with client("client") as c:  # no key: the certificate's CN is team-b's user
            assert [a.adapter_id for a in c.list_adapters()] == ["billing"]
            with pytest.raises(lc.PermissionDenied):
                c.load_adapter("more", source="qv-r4")
        with client("stranger") as c:  # signed by the CA, but not in the keys file
            with pytest.raises(lc.Unauthenticated):
                c.list_adapters()
        for cert in (None, "forged"):  # no certificate, or one from another CA: the handshake fails
            with client(cert, api_key=admin) as c:
                with pytest.raises(lc.Unavailable):
                    c.list_adapters()
        capsys.readouterr()
        assert cli(["adapters", "list", "--target", server.target, "--tls-ca", str(paths["ca"]),
                    "--tls-cert", str(paths["client_cert"]), "--tls-key", str(paths["client_key"])]) == 0
        assert "billing" in capsys.readouterr().out
        assert cli(["adapters", "list", "--target", server.target, "--tls-cert", str(paths["client_cert"])]) == 2
        assert "private_key and certificate_chain go together" in capsys.readouterr().err


def test_tls_settings_go_together(assets, pki):
    _, paths, keys_file, _ = pki
    with pytest.raises(InvalidSettings) as e:
        assets.settings(tls_cert=paths["server_cert"])
    assert e.value.field == "tls_key"
    with pytest.raises(InvalidSettings) as e:
        assets.settings(tls_client_ca=paths["ca"])
    assert e.value.field == "tls_client_ca"
    with pytest.raises(InvalidSettings) as e:
        assets.settings(tls_cert=paths["server_cert"], tls_key=paths["server_cert"].parent / "missing.pem")
    assert e.value.field == "tls_key"


def test_a_certificate_that_is_not_pem_or_a_key_of_another_is_named_before_the_model_loads(assets, pki, tmp_path, capsys):
    _, paths, _, _ = pki
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    for cert, key in ((garbage, paths["server_key"]), (paths["server_cert"], paths["client_key"])):
        # A model that does not exist: the certificate must be refused before any loading.
        code = cli(["serve", "--model", str(tmp_path / "no-model"), "--auth", "none", "--port", "0",
                    "--tls-cert", str(cert), "--tls-key", str(key)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith(f"error: --tls-cert: {cert.name} and {key.name} are not a PEM certificate "
                                            "chain and its unencrypted private key"), err
    code = cli(["serve", "--model", str(tmp_path / "no-model"), "--auth", "none", "--port", "0", "--tls-cert",
                str(paths["server_cert"]), "--tls-key", str(paths["server_key"]), "--tls-client-ca", str(garbage)])
    assert code == 2 and "error: --tls-client-ca: garbage.pem is not a PEM CA bundle" in capsys.readouterr().err
