"""A clock for the batcher's timeouts that moves only when the test says (no sleeping to let time pass)."""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
