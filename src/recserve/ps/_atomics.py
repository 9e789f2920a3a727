"""Memory-ordering primitives (and a prefetch, and a bit cast) for numba kernels that share arrays across threads
and processes.

numba exposes no atomics on the CPU, so these emit the LLVM instructions directly. The seqlocks of the DRAM
tier need exactly these: an acquire load and a release store of a version word, a full fence between
the copy of a row and the re-read of its version (and one between a writer's odd version and its data),
and an atomic add for the shared access clock. Without
them LLVM may merge the two version reads of a seqlock into one, and a reader would never notice a torn row.
All take a 1-D int64 array and an index.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _pointer(context, builder, signature, args):
    array_type = signature.args[0]
    array = context.make_array(array_type)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, array_type, array, [args[1]])


@intrinsic
def load_acquire(typingctx, array, index):
    """array[index], with acquire ordering: later loads are not moved before it."""

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_pointer(context, builder, signature, args), ordering="acquire", align=8)

    return array.dtype(array, types.intp), codegen


@intrinsic
def store_release(typingctx, array, index, value):
    """array[index] = value, with release ordering: earlier stores are visible before it."""

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature, args)
        builder.store_atomic(args[2], ptr, ordering="release", align=8)
        return context.get_dummy_value()

    return types.void(array, types.intp, array.dtype), codegen


@intrinsic
def fetch_add(typingctx, array, index, value):
    """Atomically add value to array[index]; returns the old value."""

    def codegen(context, builder, signature, args):
        ptr = _pointer(context, builder, signature, args)
        return builder.atomic_rmw("add", ptr, args[2], ordering="seq_cst")

    return array.dtype(array, types.intp, array.dtype), codegen


def _fence(ordering: str):
    def fence(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence(ordering)
            return context.get_dummy_value()

        return types.void(), codegen

    return intrinsic(fence)


# On x86 both compile to no instruction at all, only to a barrier the compiler may not move memory accesses
# across; the hardware already keeps loads in order and stores in order. (A seq_cst fence would be an
# mfence, which drains the store buffer and made each row copy wait for its output stores: 6x slower.)
acquire_fence = _fence("acquire")
acquire_fence.__doc__ = "Loads before it complete before loads and stores after it (seqlock readers)."
release_fence = _fence("release")
release_fence.__doc__ = "Loads and stores before it complete before stores after it (seqlock writers)."


@intrinsic
def prefetch(typingctx, array, index):
    """Start loading the cache line of array[index] (a hint; no fault if the address is bad)."""

    def codegen(context, builder, signature, args):
        byte_ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        ptr = builder.bitcast(_pointer(context, builder, signature, args), byte_ptr)
        read, keep_in_all_levels, data_cache = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        builder.call(fn, [ptr, read, keep_in_all_levels, data_cache])
        return context.get_dummy_value()

    return types.void(array, types.intp), codegen


@intrinsic
def bfloat16_to_float32(typingctx, bits):
    """The float32 whose upper half is these 16 bits (a bfloat16's value, exactly): numba has no bfloat16 type
    and no scalar bit cast, and a 16-bit table's rows reach the kernels as their raw bits."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen
