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

import (
	"fmt"
	"math"
)

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

// Limits on how a task may be cut, enforced by the scheduler on everything
// peers send and by peers on everything the scheduler answers: a piece
// size or length from the network is a number someone else chose, and
// state, loops and allocations that follow from it must stay bounded.
// (A piece size of 1 on a 256 MiB blob once made two peers allocate 2 GB
// each, and a GET of its status froze the scheduler.)
const (
	// MinSize is the smallest piece size: below it a piece costs more in
	// scheduler calls, metadata and hashing than it carries.
	MinSize int64 = 64 << 10
	// MaxSize is the largest piece size: a piece is held in memory whole
	// while it is fetched and verified.
	MaxSize int64 = 64 << 20
	// MaxLength is the longest task.
	MaxLength int64 = 1 << 40
	// MaxCount is the most pieces a task may have: 1 TiB in 16 MiB pieces
	// (the largest SizeFor picks) is 65536.
	MaxCount = 1 << 17
)

// Check reports whether a task of length bytes may be cut into pieces of
// size bytes: the size within MinSize..MaxSize, the length within
// 0..MaxLength, at most MaxCount pieces.
func Check(length, size int64) error {
	switch {
	case size < MinSize || size > MaxSize:
		return fmt.Errorf("piece size %d outside %d..%d", size, MinSize, MaxSize)
	case length < 0 || length > MaxLength:
		return fmt.Errorf("length %d outside 0..%d", length, MaxLength)
	case Count(length, size) > MaxCount:
		return fmt.Errorf("length %d in pieces of %d is more than %d pieces", length, size, MaxCount)
	}
	return nil
}

// Fit returns size if Check accepts it for length, else the nearest size
// it accepts (so that a configured size cuts every task within limits);
// ok is false when no size fits (the length is out of range).
func Fit(length, size int64) (_ int64, ok bool) {
	if length < 0 || length > MaxLength {
		return 0, false
	}
	size = min(max(size, MinSize), MaxSize)
	for Count(length, size) > MaxCount {
		size *= 2
	}
	return size, size <= MaxSize
}

// SizeFor returns the piece size for a task of length bytes: the smallest
// power of two from 1 MiB that cuts it into at most 128 pieces, up to 16 MiB.
func SizeFor(length int64) int64 {
	s := minAuto
	for s < maxAuto && length > s*targetCount {
		s *= 2
	}
	if s, ok := Fit(length, s); ok {
		return s
	}
	return s
}

// Count is the number of pieces of a task of length bytes (0 for a size
// that is not positive).
func Count(length, size int64) int {
	if length <= 0 || size <= 0 {
		return 0
	}
	n := length / size
	if length%size != 0 {
		n++
	}
	if n > math.MaxInt32 {
		// Piece numbers are int32 on the wire; nobody asks for more.
		return math.MaxInt32
	}
	return int(n)
}

// Range returns the offset and length of piece n; a piece outside the
// task is empty.
func Range(n int, length, size int64) (off, l int64) {
	if n < 0 || size <= 0 || length <= 0 || int64(n) > (length-1)/size {
		return 0, 0
	}
	off = int64(n) * size
	return off, min(size, length-off)
}

// Covering returns the first and last piece holding bytes [off, off+n) of a
// task of length bytes; ok is false for an empty or out-of-range span.
func Covering(off, n, length, size int64) (first, last int, ok bool) {
	if n <= 0 || off < 0 || off >= length || size <= 0 {
		return 0, 0, false
	}
	end := length
	if n < length-off {
		end = off + n
	}
	if (end-1)/size > math.MaxInt32 {
		return 0, 0, false
	}
	return int(off / size), int((end - 1) / size), true
}
