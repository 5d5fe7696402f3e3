"""`ohlora bench`: our pipeline against a reproduction of the original's, on random weights.

Nothing is downloaded: every model is built with random weights in the real shapes (or fewer
layers for --quick, said so in the output) into a temporary on-disk layout, and each side is
measured in its own process so that their memory does not mix. See `bench.cli`.
"""
