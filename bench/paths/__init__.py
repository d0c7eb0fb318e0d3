"""The measured paths, one module each (`direct`, `haproxy`, `haproxy_tcp`, `ztunnel`, `ztunnel_ebpf`,
`waypoint`), and their registry (`registry`).

A path module defines a `PathKind` (name + how to set it up on a topology, see `base`); `registry.REGISTRY`
lists them in the table's column order. Adding a path is a new module and a line there, not a branch in the run.
"""
