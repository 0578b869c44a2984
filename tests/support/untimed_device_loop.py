"""A stand-in for a GPU backend's device loop on the host: it takes `timers` and fills none, as
engine/runtime/device_loop.py does."""


class UntimedDeviceLoop:
    def __init__(self, host_loop):
        self.host_loop = host_loop

    def denoise(self, plan, seeds, conditioning, on_step=None, timers=None, snapshots=None, host_x=False):
        return self.host_loop.denoise(plan, seeds, conditioning, on_step=on_step, snapshots=snapshots)
