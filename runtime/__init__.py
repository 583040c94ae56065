"""Run a model: the PyTorch, ONNX Runtime and TensorRT runners and the choice between them
(runtime/backends.py: `create_runner`). Imports model/, never export/ or service/."""
