// Package byterange holds sets of byte ranges of a blob: what a peer
// holds of a lazily read blob outside whole pieces, in its storage and at
// the scheduler.
package byterange

import "sort"

// Span is the half-open byte range [Off, End).
type Span struct{ Off, End int64 }

// Set is a sorted list of disjoint spans that do not touch: adding a span
// merges it with its neighbours, so a reader that reads a blob front to
// back leaves one span, not one per read. The zero value is empty.
type Set []Span

// Add merges [off, end) into the set.
func (s *Set) Add(off, end int64) {
	if off >= end {
		return
	}
	v := *s
	// The first span that ends at or after off may touch or overlap it.
	i := sort.Search(len(v), func(i int) bool { return v[i].End >= off })
	j := i
	for j < len(v) && v[j].Off <= end {
		off, end = min(off, v[j].Off), max(end, v[j].End)
		j++
	}
	if i == j {
		v = append(v, Span{})
		copy(v[i+1:], v[i:])
		v[i] = Span{off, end}
	} else {
		v[i] = Span{off, end}
		v = append(v[:i+1], v[j:]...)
	}
	*s = v
}

// CoverEnd is the end of the span holding pos, or pos when none does.
func (s Set) CoverEnd(pos int64) int64 {
	i := sort.Search(len(s), func(i int) bool { return s[i].End > pos })
	if i < len(s) && s[i].Off <= pos {
		return s[i].End
	}
	return pos
}

// NextStart is the start of the first span after pos, or -1.
func (s Set) NextStart(pos int64) int64 {
	i := sort.Search(len(s), func(i int) bool { return s[i].Off > pos })
	if i < len(s) {
		return s[i].Off
	}
	return -1
}

// Covers reports whether the set holds all of [off, end).
func (s Set) Covers(off, end int64) bool {
	return off >= end || s.CoverEnd(off) >= end
}

// Bytes is how many bytes the set holds.
func (s Set) Bytes() int64 {
	var n int64
	for _, sp := range s {
		n += sp.End - sp.Off
	}
	return n
}
