"""Tools for tests, benchmarks and the demo, not pipeline stages: the synthetic MIMIC-CXR corpus generator
(``tools.synth``, which writes ``data/demo``) and the tiny local LLaMA for the fine-tuning and vLLM tests
(``tools.tiny_model``). They import the pipeline (``workflow``); the pipeline never imports them."""
