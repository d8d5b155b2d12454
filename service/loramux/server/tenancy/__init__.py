"""Tenants: API keys and the keys file, quotas, where each tenant's adapters may come from."""
