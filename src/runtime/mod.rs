//! The only module that touches `ort`: library discovery, providers, sessions, tensors.
