"""The bottom layer: plumbing every package may use and that uses none of them (netns, HTTP/1 parsing)."""
