"""The HTTP port: AgentService for browsers (Connect, gRPC-Web), Server-Sent Events, the console."""
