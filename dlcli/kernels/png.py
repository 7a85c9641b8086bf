"""A batch of PNG files read and decoded in one compiled call, without the GIL: each file is opened and read by the
C library's open/read/close (called by address), its chunks walked, its IDAT data inflated (RFC 1950 zlib around
RFC 1951 DEFLATE, the Adler-32 checked, as zlib.decompress does) and its row filters undone (the PNG specification,
section 9) straight into the batch's pixels. Python's share is one call per batch: read by Python between the
kernel's calls, each file's ~0.7 us of Python and its three system calls' returns took the GIL ~200 times a batch
from the training thread, whose every wait for it is a sleep and a wake.

A file is decoded here only when everything in it is as expected (8 bits, not interlaced, the run's size and
colour type, a complete stream whose length is exactly the rows'); for anything else, and a file that cannot be
opened or read, the kernel says no and the caller leaves the file to Pillow, which decodes it or names what is
wrong. Saying no is always safe, so every doubtful case (an incomplete Huffman code zlib would reject, a distance
before the first byte, data past the end) is a no. Its reference is Pillow's PNG decoder, not a NumPy twin:
data/png.py decodes with Pillow whenever this module does not run (DLCLI_KERNELS=numpy, no numba), and the tests
compare the two bit for bit (and the inflate with zlib's on valid and damaged streams).
"""
import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from dlcli.kernels.lanes import call_void

SIGNATURE = np.frombuffer(b"\x89PNG\r\n\x1a\n", np.uint8)
IHDR, IDAT, IEND, ACTL, FCTL = (int.from_bytes(k, "big") for k in (b"IHDR", b"IDAT", b"IEND", b"acTL", b"fcTL"))
# DEFLATE's length codes 257-285 and distance codes 0-29: base values and extra bits (RFC 1951, 3.2.5)
LENGTH_BASE = np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
                        131, 163, 195, 227, 258], np.int64)
LENGTH_EXTRA = np.array([0] * 8 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [0], np.int64)
DISTANCE_BASE = np.array([1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
                          2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577], np.int64)
DISTANCE_EXTRA = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
                           13, 13], np.int64)
CODE_LENGTH_ORDER = np.array([16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15], np.int64)
FIXED_LENGTHS = np.array([8] * 144 + [9] * 112 + [7] * 24 + [8] * 8 + [5] * 32, np.int64)  # 288 literal, 32 distance
TABLE_BITS = 9  # codes up to this long are one table look-up; longer ones (rare symbols) are read bit by bit


@numba.njit(cache=True, nogil=True)
def decode(paths, starts, index, calls, give_way, out, color_type, channels):
    """paths uint8: NUL-terminated file paths, path f at paths[starts[f]:], the batch's files `index` -> out (n,
    height, width * channels), uint8 or float32: the pixels of each file this path decodes. calls: the addresses of
    open, read, close and sched_yield and open's flags. Returns uint8 (n,) 1 where decoded, 0 where the file is
    left to the caller (its row of out unset). With give_way the core is offered to any thread waiting for it after
    each file (sched_yield): a lane polling for its next task on this core would otherwise wait for the whole batch.
    Behind a thread decoding batches at niceness 10 on its core, a poll saw its counter after 3.0-3.7 ms (median;
    load 6-7), 7-220 us with a yield after each file, which costs ~1 us a file (28 us with one every 4 files, half
    the cost)."""
    n, height, stride = out.shape
    done = np.zeros(n, np.uint8)
    data = np.empty(1 << 12, np.uint8)  # one file's bytes, grown to the largest file
    compressed = np.empty(len(data), np.uint8)
    raw = np.empty((height, 1 + stride), np.uint8)
    zeros = np.zeros(1 + stride, np.uint8)
    tables, counts, symbols, lengths, scratch = _workspace()
    for i in range(n):
        size, data = _read(paths, starts[index[i]], calls, data)
        if len(compressed) < len(data):
            compressed = np.empty(len(data), np.uint8)
        m = _idat(data, size, stride // channels, height, color_type, compressed) if size >= 0 else -1
        if (m >= 0 and _inflate(compressed, m, raw.reshape(-1), tables, counts, symbols, lengths, scratch)
                and _unfilter(raw, channels, zeros)):
            for r in range(height):
                for k in range(stride):
                    out[i, r, k] = raw[r, 1 + k]
            done[i] = 1
        if give_way:
            call_void(calls[3])
    return done


@numba.njit(cache=True, nogil=True)
def _read(paths, start, calls, data):
    """(the file's size, data holding its bytes) for the path at paths[start:] read whole, data grown (doubled) when
    the file does not fit; size -1 where it cannot be opened or read (Pillow names the problem). A read that fills
    less than the room left is the last: a regular file is read short only at its end (no read to see 0 bytes, a
    system call in four), and a file read short anyway ends before its IEND, so the caller leaves it to Pillow."""
    fd = _open(calls[0], paths, start, calls[4])
    if fd < 0:
        return -1, data
    size = 0
    while True:
        if size == len(data):
            grown = np.empty(2 * len(data), np.uint8)
            grown[:size] = data
            data = grown
        room = len(data) - size
        got = _read_into(calls[1], fd, data, size)
        if got > 0:
            size += got
        if got != room:
            break
    _close(calls[2], fd)
    return (size if got >= 0 else -1), data


@intrinsic
def _open(typingctx, fn, paths, start, flags):
    """open(&paths[start], flags) at address fn (declared variadic, as open is): the descriptor, or -1."""
    def codegen(context, builder, sig, args):
        fn_v, paths_v, start_v, flags_v = args
        i32, ptr = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i32, [ptr, i32], var_arg=True)
        path = builder.gep(context.make_array(sig.args[1])(context, builder, paths_v).data, [start_v])
        return builder.call(builder.inttoptr(fn_v, fnty.as_pointer()),
                            [builder.bitcast(path, ptr), builder.trunc(flags_v, i32)])

    return types.int32(fn, paths, start, flags), codegen


@intrinsic
def _read_into(typingctx, fn, fd, data, start):
    """read(fd, &data[start], len(data) - start) at address fn: the bytes read, 0 at the file's end, -1 on error."""
    def codegen(context, builder, sig, args):
        fn_v, fd_v, data_v, start_v = args
        size_t, ptr = context.get_value_type(types.intp), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(size_t, [ir.IntType(32), ptr, size_t])
        array = context.make_array(sig.args[2])(context, builder, data_v)
        room = builder.sub(builder.extract_value(array.shape, 0), start_v)
        return builder.call(builder.inttoptr(fn_v, fnty.as_pointer()),
                            [builder.trunc(fd_v, ir.IntType(32)), builder.bitcast(builder.gep(array.data, [start_v]),
                                                                                  ptr), room])

    return types.intp(fn, fd, data, start), codegen


@intrinsic
def _close(typingctx, fn, fd):
    """close(fd) at address fn."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.trunc(args[1], ir.IntType(32))])

    return types.int32(fn, fd), codegen


@numba.njit(cache=True, nogil=True)
def inflate(src, dst):
    """The zlib stream src inflated into dst: True where it is valid and fills dst exactly (as decode's files)."""
    tables, counts, symbols, lengths, scratch = _workspace()
    return _inflate(src, len(src), dst, tables, counts, symbols, lengths, scratch)


@numba.njit(cache=True, nogil=True)
def _workspace():
    """_inflate's arrays: codes' tables, counts and symbols (rows: the block's literal/length and distance codes,
    its code-length code, DEFLATE's fixed literal/length and distance codes, built here), code lengths, scratch."""
    tables = np.zeros((5, 1 << TABLE_BITS), np.int32)
    counts = np.zeros((5, 16), np.int64)
    symbols = np.zeros((5, 320), np.int64)
    scratch = np.zeros(320, np.int64)
    _code(FIXED_LENGTHS, 288, tables[3], counts[3], symbols[3], scratch, False)
    _code(FIXED_LENGTHS[288:], 32, tables[4], counts[4], symbols[4], scratch, False)
    return tables, counts, symbols, np.zeros(320, np.int64), scratch


@numba.njit(cache=True, nogil=True)
def _u32(data, pos):
    return (np.int64(data[pos]) << 24) | (np.int64(data[pos + 1]) << 16) | (np.int64(data[pos + 2]) << 8) \
        | np.int64(data[pos + 3])


@numba.njit(cache=True, nogil=True)
def _idat(data, end, width, height, color_type, compressed):
    """The length of the IDAT data of the PNG in data[:end], joined into `compressed`, when it is 8 bits, not
    interlaced, `width` x `height` of `color_type`, not animated (Pillow knows which frame comes first) and
    complete up to IEND; else -1."""
    if end < 33:
        return -1
    for k in range(8):
        if data[k] != SIGNATURE[k]:
            return -1
    if (_u32(data, 8) != 13 or _u32(data, 12) != IHDR or _u32(data, 16) != width
            or _u32(data, 20) != height or data[24] != 8 or data[25] != color_type
            or data[26] != 0 or data[27] != 0 or data[28] != 0):
        return -1
    pos, m = 33, 0
    while True:
        if pos + 8 > end:
            return -1  # no IEND: truncated
        size, kind = _u32(data, pos), _u32(data, pos + 4)
        if kind == IEND:
            return m
        if pos + 12 + size > end or kind == ACTL or kind == FCTL:
            return -1
        if kind == IDAT:
            compressed[m:m + size] = data[pos + 8:pos + 8 + size]
            m += size
        pos += 12 + size


@numba.njit(cache=True, nogil=True)
def _code(lengths, count, table, counts, symbols, offsets, incomplete_ok):
    """A canonical Huffman code from `count` code lengths (RFC 1951, 3.2.2): `table` indexed by the next bits
    (codes up to the table's bits; entry symbol << 4 | length, 0 where a longer code or none starts), `counts` codes
    per length and `symbols` sorted by code, for the longer codes. Returns the table's bits, or -1 for a code zlib
    refuses: over-subscribed, or incomplete (allowed only as a single one-bit literal or distance code)."""
    counts[:] = 0
    for s in range(count):
        counts[lengths[s]] += 1
    counts[0] = 0
    left, longest = 1, 0
    for length in range(1, 16):
        left = 2 * left - counts[length]
        if left < 0:
            return -1
        if counts[length]:
            longest = length
    if left > 0 and longest > 0 and not (incomplete_ok and longest == 1):
        return -1
    offsets[:2] = 0
    for length in range(1, 15):
        offsets[length + 1] = offsets[length] + counts[length]
    for s in range(count):
        if lengths[s]:
            symbols[offsets[lengths[s]]] = s
            offsets[lengths[s]] += 1
    bits = min(longest, TABLE_BITS)
    size = 1 << bits
    table[:size] = 0
    code = k = 0
    for length in range(1, bits + 1):
        for _ in range(counts[length]):
            reversed_code, c = 0, code
            for _ in range(length):  # Huffman codes are packed from their most significant bit
                reversed_code = (reversed_code << 1) | (c & 1)
                c >>= 1
            for f in range(reversed_code, size, 1 << length):
                table[f] = (symbols[k] << 4) | length
            code += 1
            k += 1
        code <<= 1
    return bits


@numba.njit(cache=True, nogil=True, inline="always")
def _refill(src, n, pos, bitbuf, have):
    """(pos, bitbuf, have) after reading whole bytes of src[:n] into bitbuf until it holds more than 48 bits (at
    most 56 fit an int64; a length and distance pair needs at most 48); bytes past n read as zeros. Inlined into
    _inflate's IR, so it costs no call."""
    while have <= 48:
        bitbuf |= np.int64(src[pos] if pos < n else 0) << have
        pos += 1
        have += 8
    return pos, bitbuf, have


@numba.njit(cache=True, nogil=True)
def _long_symbol(counts, symbols, bitbuf):
    """(symbol, its length in bits) of a code longer than its table's bits at the start of bitbuf, or (-1, 0) where
    none is: canonical decoding one bit at a time (zlib's puff). The callers look the table up themselves: called,
    even this one look-up made a literal 2.5x slower (numba's calls are not inlined)."""
    code = first = index = np.int64(0)
    for length in range(1, 16):
        code |= (bitbuf >> (length - 1)) & 1
        if code - counts[length] < first:
            return symbols[index + code - first], np.int64(length)
        index += counts[length]
        first = (first + counts[length]) << 1
        code <<= 1
    return np.int64(-1), np.int64(0)


@numba.njit(cache=True, nogil=True)
def _inflate(src, n, dst, tables, counts, symbols, lengths, scratch):
    """The zlib stream src[:n] inflated into all of dst: True when it is valid, ends with a correct Adler-32 and
    fills dst exactly; bits past src's end read as zeros, and using any is a failure."""
    if n < 7 or src[0] & 15 != 8 or src[0] >> 4 > 7 or (np.int64(src[0]) * 256 + src[1]) % 31 or src[1] & 32:
        return False  # not deflate, a window over 32K, a bad header check, or a preset dictionary
    size = dst.shape[0]
    pos, bitbuf, have, out, final = 2, np.int64(0), 0, 0, 0
    while not final:
        pos, bitbuf, have = _refill(src, n, pos, bitbuf, have)
        final, kind = bitbuf & 1, (bitbuf >> 1) & 3
        bitbuf >>= 3
        have -= 3
        if kind == 0:  # stored: LEN, NLEN and the bytes, from the next byte boundary
            p = pos - have // 8
            bitbuf, have = np.int64(0), 0
            if p + 4 > n:
                return False
            length = np.int64(src[p]) | (np.int64(src[p + 1]) << 8)
            if length != (~(np.int64(src[p + 2]) | (np.int64(src[p + 3]) << 8)) & 0xFFFF):
                return False
            p += 4
            if p + length > n or out + length > size:
                return False
            dst[out:out + length] = src[p:p + length]
            out += length
            pos = p + length
            continue
        if kind == 3:
            return False
        if kind == 1:
            lit, dist = 3, 4  # built by _workspace: 9 and 5 bits at most
            lit_bits, dist_bits = min(9, TABLE_BITS), min(5, TABLE_BITS)
        else:
            lit, dist = 0, 1
            literals, distances, code_lengths = 257 + (bitbuf & 31), 1 + ((bitbuf >> 5) & 31), 4 + ((bitbuf >> 10) & 15)
            bitbuf >>= 14
            have -= 14
            if literals > 286 or distances > 30:
                return False
            lengths[:19] = 0
            for j in range(code_lengths):
                if have < 3:
                    pos, bitbuf, have = _refill(src, n, pos, bitbuf, have)
                lengths[CODE_LENGTH_ORDER[j]] = bitbuf & 7
                bitbuf >>= 3
                have -= 3
            len_table, len_counts, len_symbols = tables[2], counts[2], symbols[2]
            len_bits = _code(lengths, 19, len_table, len_counts, len_symbols, scratch, False)
            if len_bits < 0:
                return False
            len_mask = (np.int64(1) << len_bits) - 1
            j = 0
            while j < literals + distances:
                if have < 15 + 7:
                    pos, bitbuf, have = _refill(src, n, pos, bitbuf, have)
                e = len_table[bitbuf & len_mask]
                s, used = (np.int64(e >> 4), np.int64(e & 15)) if e else _long_symbol(len_counts, len_symbols, bitbuf)
                if s < 0:
                    return False
                bitbuf >>= used
                have -= used
                if s < 16:
                    lengths[j] = s
                    j += 1
                    continue
                if s == 16:
                    if j == 0:
                        return False
                    value, repeat, extra = lengths[j - 1], 3, 2
                else:
                    value, repeat, extra = 0, (3 if s == 17 else 11), (3 if s == 17 else 7)
                repeat += bitbuf & ((1 << extra) - 1)
                bitbuf >>= extra
                have -= extra
                if j + repeat > literals + distances:
                    return False
                lengths[j:j + repeat] = value
                j += repeat
            if lengths[256] == 0:
                return False  # no end-of-block code
            lit_bits = _code(lengths, literals, tables[0], counts[0], symbols[0], scratch, True)
            dist_bits = _code(lengths[literals:], distances, tables[1], counts[1], symbols[1], scratch, True)
        if lit_bits < 0 or dist_bits < 0:
            return False
        lit_table, lit_counts, lit_symbols = tables[lit], counts[lit], symbols[lit]  # views made once, not per symbol
        dist_table, dist_counts, dist_symbols = tables[dist], counts[dist], symbols[dist]
        lit_mask, dist_mask = (np.int64(1) << lit_bits) - 1, (np.int64(1) << dist_bits) - 1
        while True:
            if have < 48:
                pos, bitbuf, have = _refill(src, n, pos, bitbuf, have)
            e = lit_table[bitbuf & lit_mask]
            s, used = (np.int64(e >> 4), np.int64(e & 15)) if e else _long_symbol(lit_counts, lit_symbols, bitbuf)
            if s < 0:
                return False
            bitbuf >>= used
            have -= used
            if s < 256:
                if out >= size:
                    return False
                dst[out] = s
                out += 1
                continue
            if s == 256:
                break
            s -= 257
            if s >= 29:
                return False
            length = LENGTH_BASE[s] + (bitbuf & ((1 << LENGTH_EXTRA[s]) - 1))
            bitbuf >>= LENGTH_EXTRA[s]
            have -= LENGTH_EXTRA[s]
            e = dist_table[bitbuf & dist_mask]
            s, used = (np.int64(e >> 4), np.int64(e & 15)) if e else _long_symbol(dist_counts, dist_symbols, bitbuf)
            if s < 0 or s >= 30:
                return False
            bitbuf >>= used
            have -= used
            distance = DISTANCE_BASE[s] + (bitbuf & ((1 << DISTANCE_EXTRA[s]) - 1))
            bitbuf >>= DISTANCE_EXTRA[s]
            have -= DISTANCE_EXTRA[s]
            if distance > out or out + length > size:
                return False
            if distance == 1:  # a run of one byte (PNG's flat rows): a fill, not a byte waiting on the one before
                value = dst[out - 1]
                for k in range(out, out + length):
                    dst[k] = value
            else:
                for k in range(out, out + length):  # byte by byte: the copy may overlap what it writes
                    dst[k] = dst[k - distance]
            out += length
    p = pos - have // 8  # the first byte not read: the Adler-32 follows the last block's byte
    if out != size or p + 4 > n:
        return False
    a, b, k = np.int64(1), np.int64(0), 0
    while k < size:  # Adler-32 a block at a time: b gains m * a and each byte times the bytes from it to the end
        stop = min(size, k + (1 << 20))  # (sums that vectorise, where byte-by-byte b waits on a); int64 holds them
        ones = weighted = np.int64(0)
        for j in range(k, stop):
            ones += dst[j]
            weighted += (stop - j) * np.int64(dst[j])
        b = (b + (stop - k) * a + weighted) % 65521
        a = (a + ones) % 65521
        k = stop
    return ((b << 16) | a) == _u32(src, p)


@numba.njit(cache=True, nogil=True)
def _unfilter(raw, bpp, zeros):
    """PNG's row filters undone in place: raw (height, 1 + row bytes), each row its filter byte, 0 None, 1 Sub,
    2 Up, 3 Average, 4 Paeth, and every byte after it the difference from a predictor of the bytes already decoded
    to its left (a), above (b) and above-left (c); above the first row and left of the first pixel are zeros (the
    row `zeros`). One loop per filter and per byte of the pixel, a and c carried in registers: Sub, Average and
    Paeth wait on the byte just decoded. False for a filter byte PNG does not define (Pillow names it)."""
    height, stride = raw.shape[0], raw.shape[1] - 1
    for r in range(height):
        row, above, kind = raw[r], (raw[r - 1] if r > 0 else zeros), raw[r, 0]
        if kind > 4:
            return False
        if kind == 2:
            for k in range(1, stride + 1):
                row[k] += above[k]  # uint8 arithmetic: modulo 256, as the specification's
        elif kind != 0:
            for j in range(1, bpp + 1):
                a = c = np.int32(0)
                for k in range(j, stride + 1, bpp):
                    b = np.int32(above[k])
                    if kind == 1:
                        a = (np.int32(row[k]) + a) & 255
                    elif kind == 3:
                        a = (np.int32(row[k]) + (a + b) // 2) & 255
                    else:
                        p = a + b - c
                        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                        a = (np.int32(row[k]) + (a if pa <= pb and pa <= pc else (b if pb <= pc else c))) & 255
                    row[k] = a
                    c = b
    return True
