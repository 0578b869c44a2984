"""A stand-in `tensorrt` module with the 10.x/11.x Python API names ddengine uses (no GPU, no TensorRT).

`faults` names calls that fail the way TensorRT does: they log an error through the logger they were given
and return None/False. Every call is recorded in `calls`, so tests can assert what the builder was told.
"""

import enum
import types

import numpy as np


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}


def make_module(version="10.99.0", faults=(), io=None):
    """A fresh fake module; `io` = {name: (mode, DataType, shape)} of the engines it 'deserializes'."""
    # on_execute(context, stream), when set, does the forward (tests pair it with cuda_emulator.py)
    state = types.SimpleNamespace(faults=set(faults), calls=[], builds=0, deserialized=0, on_execute=None)
    io = io or {
        "sample": (TensorIOMode.INPUT, DataType.FLOAT, (-1, 1, 8, 8)),
        "timestep": (TensorIOMode.INPUT, DataType.INT64, (-1,)),
        "out": (TensorIOMode.OUTPUT, DataType.FLOAT, (-1, 1, 8, 8)),
    }

    def fail(logger, what, message):
        state.calls.append(("fault", what))
        logger.log(Severity.ERROR, message)

    class HostMemory(bytes):
        """IHostMemory exposes the buffer protocol; a bytes subclass does too."""

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return HostMemory(b"TIMING:" + self.data)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            state.calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class BuilderConfig:
        def __init__(self, logger):
            self.logger, self.flags, self.cache = logger, [], None
            self.hardware_compatibility_level = "NONE"

        def set_flag(self, flag):
            self.flags.append(flag)
            state.calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            state.calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile):
            state.calls.append(("add_optimization_profile", dict(profile.shapes)))
            if "add_optimization_profile" in state.faults:
                fail(
                    self.logger,
                    "add_optimization_profile",
                    "Specified optimization profiles must satisfy MIN<=OPT<=MAX",
                )
                return -1
            return 0

        def create_timing_cache(self, data):
            state.calls.append(("create_timing_cache", bytes(data)))
            if "create_timing_cache" in state.faults:
                fail(self.logger, "create_timing_cache", "timing cache is corrupted")
                return None
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            if "set_timing_cache" in state.faults:
                fail(self.logger, "set_timing_cache", "timing cache mismatch")
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Network:
        def __init__(self, flags):
            self.flags = flags

    class Builder:
        def __init__(self, logger):
            self.logger = logger
            state.calls.append(("Builder",))

        def create_network(self, flags):
            state.calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            if "create_builder_config" in state.faults:
                fail(self.logger, "create_builder_config", "out of host memory")
                return None
            state.config = BuilderConfig(self.logger)
            return state.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            state.builds += 1
            state.calls.append(("build_serialized_network", network.flags, list(config.flags)))
            if "build" in state.faults:
                fail(
                    self.logger, "build", "[optimizer] Internal Error: could not find any implementation for node /conv"
                )
                return None
            self.logger.log(Severity.WARNING, "using a fake builder")
            return HostMemory(b"FAKEPLAN" + state.onnx_sha[:16].encode())

    class OnnxParser:
        def __init__(self, network, logger):
            self.logger, self.errors = logger, []

        def parse_from_file(self, path):
            import hashlib
            from pathlib import Path

            state.onnx_sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            state.calls.append(("parse_from_file", path))
            if "parse" in state.faults:
                self.errors = ["In node 3 (parseGraph): INVALID_NODE: Invalid Node - /Conv unsupported"]
                self.logger.log(Severity.ERROR, "ModelImporter.cpp:912: failed to import /Conv")
                return False
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Context:
        def __init__(self, logger):
            self.logger, self.shapes, self.addresses = logger, {}, {}

        def set_input_shape(self, name, shape):
            if "set_input_shape" in state.faults:
                fail(self.logger, "set_input_shape", f"{name}: dimension 0 of {tuple(shape)} exceeds the profile max")
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            if "set_tensor_address" in state.faults:
                fail(self.logger, "set_tensor_address", f"{name}: address is not aligned")
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            state.calls.append(("execute_async_v3", stream))
            if "execute_async_v3" in state.faults:
                fail(self.logger, "execute_async_v3", "engine plan was generated on an incompatible device")
                return False
            if state.on_execute is not None:
                state.on_execute(self, stream)
            return True

    class Engine:
        def __init__(self, logger):
            self.logger = logger
            self.names = list(io)

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return io[name][0]

        def get_tensor_dtype(self, name):
            return io[name][1]

        def get_tensor_shape(self, name):
            return io[name][2]

        def create_execution_context(self):
            if "create_execution_context" in state.faults:
                fail(self.logger, "create_execution_context", "out of device memory")
                return None
            return Context(self.logger)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            state.deserialized += 1
            state.calls.append(("deserialize_cuda_engine", bytes(data)))
            if "deserialize" in state.faults:
                fail(
                    self.logger,
                    "deserialize",
                    "Serialization assertion stdVersionRead == kSERIALIZATION_VERSION failed",
                )
                return None
            return Engine(self.logger)

    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.state = state
    module.ILogger = ILogger
    module.Logger = ILogger
    module.Builder, module.OnnxParser, module.Runtime = Builder, OnnxParser, Runtime
    module.DataType, module.TensorIOMode = DataType, TensorIOMode
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    module.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32")
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    module.HardwareCompatibilityLevel = types.SimpleNamespace(NONE="NONE", AMPERE_PLUS="AMPERE_PLUS")
    module.nptype = lambda dtype: _NP[dtype]
    return module
