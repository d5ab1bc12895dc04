"""The scheduling core: each model's lifecycle, the queue, admission and placement on the GPU."""
