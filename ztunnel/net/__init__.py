"""The bottom layer: plumbing every package may use and that uses none of them (byte streams and
TCP, deadlines, netns, HTTP/1 parsing, private unix sockets)."""
