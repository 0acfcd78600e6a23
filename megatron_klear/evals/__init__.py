"""The paper's evaluation: benchmarks read from their public files (``benchmarks``,
``livecodebench``), their protocols, and the scoring and report of sampled responses
(``scoring``). No engine here: ``tools/eval.py`` generates the responses, or reads them from a
file made by any engine."""
