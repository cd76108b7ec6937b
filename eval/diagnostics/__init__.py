"""Finished studies: each answered one question about DuplexKV or SGLang's KV layout, and its
result JSON stays under eval/results/. Kept so the figures can be reproduced, not maintained
as tools (eval/README.md lists what each showed)."""
