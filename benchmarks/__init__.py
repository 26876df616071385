"""potsa benchmarks: the offline parallel-speech corpus, the README demo, ablations and speed measurements."""
