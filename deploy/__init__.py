"""How modstream runs: the CLI's launch code, the embedded broker, Serve and
monitoring configuration."""
