"""Generated gRPC/protobuf modules for the Istio CA API (see ca.proto for how to regenerate)."""
