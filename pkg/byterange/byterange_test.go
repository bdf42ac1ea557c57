package byterange

import (
	"math/rand/v2"
	"testing"
)

func TestSetMatchesBitmap(t *testing.T) {
	const size = 200
	r := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 200; round++ {
		var s Set
		var bits [size]bool
		for k := 0; k < 12; k++ {
			off := r.Int64N(size)
			end := off + r.Int64N(size-off+1)
			s.Add(off, end)
			for i := off; i < end; i++ {
				bits[i] = true
			}
			for i := 1; i < len(s); i++ {
				if s[i-1].End >= s[i].Off {
					t.Fatalf("spans touch or overlap: %v", s)
				}
			}
			var n int64
			for pos := int64(0); pos < size; pos++ {
				if bits[pos] {
					n++
				}
				e := s.CoverEnd(pos)
				want := pos
				for want < size && bits[want] {
					want++
				}
				if e != want {
					t.Fatalf("CoverEnd(%d) = %d, want %d (set %v)", pos, e, want, s)
				}
			}
			if s.Bytes() != n {
				t.Fatalf("Bytes = %d, want %d", s.Bytes(), n)
			}
		}
	}
}

func TestNextStartAndCovers(t *testing.T) {
	var s Set
	s.Add(10, 20)
	s.Add(30, 40)
	s.Add(20, 25) // touches: merges
	if len(s) != 2 || s[0] != (Span{10, 25}) {
		t.Fatalf("set %v", s)
	}
	if got := s.NextStart(0); got != 10 {
		t.Fatalf("NextStart(0) = %d", got)
	}
	if got := s.NextStart(10); got != 30 {
		t.Fatalf("NextStart(10) = %d", got)
	}
	if got := s.NextStart(30); got != -1 {
		t.Fatalf("NextStart(30) = %d", got)
	}
	if !s.Covers(12, 25) || s.Covers(12, 26) || !s.Covers(5, 5) {
		t.Fatal("Covers")
	}
}
