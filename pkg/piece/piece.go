// Package piece does the arithmetic of cutting a task into pieces.
//
// Unless configured, the piece size follows the task's length (SizeFor):
// about 128 pieces a task, at least 1 MiB and at most 16 MiB. A piece can
// only be passed on once it is whole, so every hop of a piece through the
// network costs one piece's transfer time: small pieces keep a blob
// flowing through a chain of peers, and 1 MiB moves over a 100 Mbit/s link
// in a tenth of a second. Many pieces cost scheduler calls, metadata and a
// sha256 each, so large blobs get larger pieces: a 1 GiB blob is 128 pieces
// of 8 MiB, a 10 GiB one 640 of 16 MiB. make bench-p2p measured 1 MiB
// against 4 MiB pieces on a 128 MiB blob: the last of 8 peers finished in
// 1.4 to 1.6 times one peer's time instead of 1.8.
package piece

// LazySize is the piece size of a task a lazily mounted layer opens. Its
// reads want a few chunks of the blob, not the whole: a piece is what a
// read must wait for and what the origin must send for it, so it is kept
// small. Whole-blob downloads that join such a task use its pieces.
const LazySize int64 = 256 << 10

// DefaultSize is the piece size of a task whose length is unknown.
const DefaultSize int64 = 4 << 20

const (
	minAuto     int64 = 1 << 20
	maxAuto     int64 = 16 << 20
	targetCount int64 = 128
)

// SizeFor returns the piece size for a task of length bytes: the smallest
// power of two from 1 MiB that cuts it into at most 128 pieces, up to 16 MiB.
func SizeFor(length int64) int64 {
	s := minAuto
	for s < maxAuto && length > s*targetCount {
		s *= 2
	}
	return s
}

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
