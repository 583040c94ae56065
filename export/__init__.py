"""Export a checkpoint: ONNX graphs, their manifest, TensorRT engines (runtime/ runs them)."""
