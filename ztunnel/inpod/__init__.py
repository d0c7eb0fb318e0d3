"""The node agent <-> node proxy protocol (DESIGN §4.7), shared by `redirect` (agent) and `proxy`.

`protocol`: the messages and their codec; `session`: what each side does with them (sans-IO);
`channel`: the SOCK_SEQPACKET edge that carries them with their netns fds.
"""
