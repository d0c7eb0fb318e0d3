"""An ambient-style service mesh node proxy: mTLS, SPIFFE identities and authorization without sidecars."""

__version__ = "0.1.0"

# The project's one import-time hook: the hot modules run from the mypyc build when it matches the source
# (ztunnel/compiled). The CNI plugin's one-file build carries only this file and ztunnel/cni: it runs without.
try:
    from ztunnel.compiled import install as _install_compiled
except ModuleNotFoundError as _e:
    if _e.name != "ztunnel.compiled":
        raise
else:
    _install_compiled()
