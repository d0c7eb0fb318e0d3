"""The CNI chain plugin (`ztunnel-cni`) and its installer."""
