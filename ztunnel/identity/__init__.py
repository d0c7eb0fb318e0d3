"""SPIFFE workload identities, the CA that signs them, and the node proxy's certificate manager."""
