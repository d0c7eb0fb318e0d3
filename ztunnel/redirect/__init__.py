"""Traffic redirection: netns helpers, in-pod iptables rules, eBPF loader, the node agent."""
