"""Export a checkpoint to ONNX / TensorRT, and the runtime backends that run it."""
