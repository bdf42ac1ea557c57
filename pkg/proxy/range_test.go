package proxy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestParseRanges(t *testing.T) {
	const size = 1000
	for _, c := range []struct {
		spec string
		want []byteRange
		err  error
	}{
		{"bytes=-100", []byteRange{{900, 100}}, nil},
		{"bytes=0-100", []byteRange{{0, 101}}, nil},
		{"bytes=100-", []byteRange{{100, 900}}, nil},
		{"bytes=100-500", []byteRange{{100, 401}}, nil},
		{"bytes=999-999", []byteRange{{999, 1}}, nil},
		{"bytes=-5000", []byteRange{{0, 1000}}, nil},
		{"bytes=900-5000", []byteRange{{900, 100}}, nil},
		{"Bytes = 1-2", []byteRange{{1, 2}}, nil},
		// Several ranges, in the order asked, as stargz-snapshotter writes
		// them (no spaces) and as RFC 9110's examples do (with spaces).
		{"bytes=0-1,5-6", []byteRange{{0, 2}, {5, 2}}, nil},
		{"bytes=500-599, 0-99, -10", []byteRange{{500, 100}, {0, 100}, {990, 10}}, nil},
		// Overlapping ranges within the blob's size are served as asked.
		{"bytes=0-10,5-15", []byteRange{{0, 11}, {5, 11}}, nil},
		// Unsatisfiable ranges are dropped; if none is left, 416.
		{"bytes=0-1,2000-3000", []byteRange{{0, 2}}, nil},
		{"bytes=, 0-1,", []byteRange{{0, 2}}, nil},
		{"bytes=1000-", nil, errUnsatisfiable},
		{"bytes=2000-3000", nil, errUnsatisfiable},
		{"bytes=-0", nil, errUnsatisfiable},
		{"bytes=2000-,3000-", nil, errUnsatisfiable},
		// More than the blob in all (overlap abuse): the whole blob.
		{"bytes=0-999,0-999", nil, errIgnoreRange},
		// One bad range spoils the set.
		{"bytes=0-1,5-1", nil, errIgnoreRange},
		{"bytes=0-1,x", nil, errIgnoreRange},
		{"bytes=5-1", nil, errIgnoreRange},
		{"bytes=a-b", nil, errIgnoreRange},
		{"bytes=+1-2", nil, errIgnoreRange},
		{"items=0-1", nil, errIgnoreRange},
		{"bytes=", nil, errIgnoreRange},
		{"bytes=,", nil, errIgnoreRange},
		{"bytes", nil, errIgnoreRange},
	} {
		got, err := parseRanges(c.spec, size)
		if !errors.Is(err, c.err) || (err == nil && !slices.Equal(got, c.want)) {
			t.Errorf("%q: %v %v, want %v %v", c.spec, got, err, c.want, c.err)
		}
	}
	if _, err := parseRanges("bytes=0-10", 0); !errors.Is(err, errUnsatisfiable) {
		t.Errorf("a range of an empty blob: %v", err)
	}
	var many []string
	for i := range maxRanges + 1 {
		many = append(many, fmt.Sprintf("%d-%d", i, i))
	}
	if _, err := parseRanges("bytes="+strings.Join(many, ","), 1<<20); !errors.Is(err, errIgnoreRange) {
		t.Errorf("%d ranges: %v, want the whole blob", maxRanges+1, err)
	}
	if rs, err := parseRanges("bytes="+strings.Join(many[:maxRanges], ","), 1<<20); err != nil || len(rs) != maxRanges {
		t.Errorf("%d ranges: %d ranges, %v", maxRanges, len(rs), err)
	}
}
