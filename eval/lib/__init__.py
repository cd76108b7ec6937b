"""What the eval scripts share: request specs from traces, the replay client, the SLO metrics,
result files, progress lines and budgets, and starting, probing and stopping SGLang servers."""
