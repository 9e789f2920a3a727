"""KServe v2 front ends (HTTP and gRPC) and their codecs."""
