package proxy

import (
	"errors"
	"testing"
)

func TestParseRange(t *testing.T) {
	const size = 1000
	for _, c := range []struct {
		spec   string
		off, n int64
		err    error
	}{
		{"bytes=-100", 900, 100, nil},
		{"bytes=0-100", 0, 101, nil},
		{"bytes=100-", 100, 900, nil},
		{"bytes=100-500", 100, 401, nil},
		{"bytes=999-999", 999, 1, nil},
		{"bytes=-5000", 0, 1000, nil},
		{"bytes=900-5000", 900, 100, nil},
		{"Bytes = 1-2", 1, 2, nil},
		{"bytes=1000-", 0, 0, errUnsatisfiable},
		{"bytes=2000-3000", 0, 0, errUnsatisfiable},
		{"bytes=-0", 0, 0, errUnsatisfiable},
		{"bytes=0-1,5-6", 0, 0, errIgnoreRange},
		{"bytes=5-1", 0, 0, errIgnoreRange},
		{"bytes=a-b", 0, 0, errIgnoreRange},
		{"bytes=+1-2", 0, 0, errIgnoreRange},
		{"items=0-1", 0, 0, errIgnoreRange},
		{"bytes=", 0, 0, errIgnoreRange},
		{"bytes", 0, 0, errIgnoreRange},
	} {
		off, n, err := parseRange(c.spec, size)
		if !errors.Is(err, c.err) || (err == nil && (off != c.off || n != c.n)) {
			t.Errorf("%q: %d+%d %v, want %d+%d %v", c.spec, off, n, err, c.off, c.n, c.err)
		}
	}
	if _, _, err := parseRange("bytes=0-10", 0); !errors.Is(err, errUnsatisfiable) {
		t.Errorf("a range of an empty blob: %v", err)
	}
}
