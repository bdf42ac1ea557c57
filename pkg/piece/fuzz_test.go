package piece

import (
	"math"
	"testing"
)

func TestCheck(t *testing.T) {
	for _, c := range []struct {
		length, size int64
		ok           bool
	}{
		{0, MinSize, true}, {1, MinSize, true}, {1 << 30, 8 << 20, true}, {MaxLength, 16 << 20, true},
		{256 << 20, 1, false}, {1 << 62, 1, false}, {10, MinSize - 1, false}, {10, MaxSize + 1, false},
		{MaxLength + 1, MaxSize, false}, {-1, MinSize, false}, {MaxLength, MinSize, false}, {10, 0, false},
	} {
		if err := Check(c.length, c.size); (err == nil) != c.ok {
			t.Errorf("Check(%d, %d) = %v, want ok %v", c.length, c.size, err, c.ok)
		}
	}
	for _, c := range []struct{ length, size, want int64 }{
		{10, 1, MinSize}, {10, 1 << 40, MaxSize}, {MaxLength, MinSize, MaxLength / MaxCount}, {1 << 30, 4 << 20, 4 << 20},
	} {
		if got, ok := Fit(c.length, c.size); !ok || got != c.want {
			t.Errorf("Fit(%d, %d) = %d, %v, want %d", c.length, c.size, got, ok, c.want)
		}
	}
	if _, ok := Fit(MaxLength+1, MinSize); ok {
		t.Error("Fit accepted a length over MaxLength")
	}
}

// FuzzPieceProtocol feeds the piece arithmetic the values a hostile peer
// or scheduler could send: nothing panics, and what comes back stays inside
// the task.
func FuzzPieceProtocol(f *testing.F) {
	f.Add(int64(1<<62), int64(1), int64(0), int64(1), 0)
	f.Add(int64(256<<20), int64(1), int64(5), int64(1<<20), 3)
	f.Add(int64(10), int64(4), int64(9), int64(100), 2)
	f.Add(int64(-1), int64(-1), int64(-1), int64(-1), -1)
	f.Add(int64(math.MaxInt64), int64(math.MaxInt64), int64(math.MaxInt64-1), int64(math.MaxInt64), math.MaxInt32)
	f.Fuzz(func(t *testing.T, length, size, off, n int64, num int) {
		count := Count(length, size)
		if count < 0 || count > math.MaxInt32 {
			t.Fatalf("Count(%d, %d) = %d", length, size, count)
		}
		if o, l := Range(num, length, size); l < 0 || o < 0 || (l > 0 && (o+l > length || l > size || num >= count)) {
			t.Fatalf("Range(%d, %d, %d) = %d+%d", num, length, size, o, l)
		}
		if first, last, ok := Covering(off, n, length, size); ok {
			if first < 0 || last < first || last >= count {
				t.Fatalf("Covering(%d, %d, %d, %d) = %d..%d of %d", off, n, length, size, first, last, count)
			}
			if fo, _ := Range(first, length, size); fo > off {
				t.Fatalf("Covering(%d, %d, %d, %d): piece %d starts at %d", off, n, length, size, first, fo)
			}
		}
		if Check(length, size) == nil {
			if size < MinSize || size > MaxSize || length > MaxLength || count > MaxCount {
				t.Fatalf("Check accepted %d in pieces of %d", length, size)
			}
		}
		if s, ok := Fit(length, size); ok {
			if err := Check(length, s); err != nil {
				t.Fatalf("Fit(%d, %d) = %d: %v", length, size, s, err)
			}
		}
		if length >= 0 && length <= MaxLength {
			if err := Check(length, SizeFor(length)); err != nil {
				t.Fatalf("SizeFor(%d) = %d: %v", length, SizeFor(length), err)
			}
		}
	})
}
