"""The model side of a worker: the extractor (model, layer taps, heads), pooling heads,
whitening, device and precision, TorchScript freezing and torch.compile."""
