// Package piece does the arithmetic of cutting a task into pieces.
//
// The default piece size is 4 MiB: large enough that a 1 GiB blob is 256
// pieces (little scheduler traffic, one sha256 per 4 MiB), small enough that
// a 100 Mbit/s link moves one in about a third of a second, so a new peer
// can serve what it has within a second of starting; it is also eStargz's
// default chunk size, so a lazy read of one chunk costs about one piece.
package piece

// DefaultSize is the piece size used unless configured otherwise.
const DefaultSize int64 = 4 << 20

// Count is the number of pieces of a task of length bytes.
func Count(length, size int64) int {
	if length <= 0 {
		return 0
	}
	return int((length + size - 1) / size)
}

// Range returns the offset and length of piece n.
func Range(n int, length, size int64) (off, l int64) {
	off = int64(n) * size
	l = min(size, length-off)
	if l < 0 {
		l = 0
	}
	return off, l
}

// Covering returns the first and last piece holding bytes [off, off+n) of a
// task of length bytes; ok is false for an empty or out-of-range span.
func Covering(off, n, length, size int64) (first, last int, ok bool) {
	if n <= 0 || off < 0 || off >= length {
		return 0, 0, false
	}
	end := min(off+n, length)
	return int(off / size), int((end - 1) / size), true
}
