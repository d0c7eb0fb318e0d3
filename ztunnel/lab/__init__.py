"""The netns lab: a multi-node cluster on one Linux machine, with real CNI plugins and processes."""
