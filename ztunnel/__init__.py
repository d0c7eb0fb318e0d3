"""An ambient-style service mesh node proxy: mTLS, SPIFFE identities and authorization without sidecars."""

__version__ = "0.1.0"
