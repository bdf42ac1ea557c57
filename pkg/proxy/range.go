package proxy

import (
	"errors"
	"strconv"
	"strings"
)

var (
	// errUnsatisfiable is a range set none of whose ranges overlaps the
	// blob (answered 416).
	errUnsatisfiable = errors.New("range not satisfiable")
	// errIgnoreRange is a Range header answered with the whole blob:
	// another unit, one we cannot parse, or a set that asks for more than
	// the blob (overlapping ranges, RFC 9110 15.5.17's abuse case).
	errIgnoreRange = errors.New("range ignored")
)

// maxRanges bounds the ranges of one request: stargz-snapshotter merges
// neighbouring chunks before asking, so real sets are far smaller, and
// each range costs a reader and a part header.
const maxRanges = 1024

// byteRange is one satisfiable range: n bytes from off.
type byteRange struct{ off, n int64 }

// parseRanges returns the satisfiable ranges (RFC 9110 14.1.2) that spec
// asks for in a blob of size bytes, in the order asked; ranges that start
// past the end are dropped, as RFC 9110 14.2 says.
func parseRanges(spec string, size int64) ([]byteRange, error) {
	unit, set, ok := strings.Cut(spec, "=")
	if !ok || !strings.EqualFold(strings.TrimSpace(unit), "bytes") {
		return nil, errIgnoreRange
	}
	var rs []byteRange
	var total int64
	n := 0
	for _, one := range strings.Split(set, ",") {
		one = strings.TrimSpace(one)
		if one == "" {
			// RFC 9110's #rule allows empty list elements.
			continue
		}
		if n++; n > maxRanges {
			return nil, errIgnoreRange
		}
		r, ok, err := parseOne(one, size)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		if total += r.n; total > size {
			return nil, errIgnoreRange
		}
		rs = append(rs, r)
	}
	if n == 0 {
		return nil, errIgnoreRange
	}
	if len(rs) == 0 {
		return nil, errUnsatisfiable
	}
	return rs, nil
}

// parseOne parses one range-spec; ok is false for a valid range that the
// blob cannot satisfy.
func parseOne(s string, size int64) (r byteRange, ok bool, err error) {
	first, last, found := strings.Cut(s, "-")
	if !found {
		return r, false, errIgnoreRange
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	if first == "" {
		// A suffix: the last N bytes.
		suffix, err := digits(last)
		if err != nil {
			return r, false, errIgnoreRange
		}
		if suffix == 0 || size == 0 {
			return r, false, nil
		}
		suffix = min(suffix, size)
		return byteRange{size - suffix, suffix}, true, nil
	}
	start, err := digits(first)
	if err != nil {
		return r, false, errIgnoreRange
	}
	end := size - 1
	if last != "" {
		e, err := digits(last)
		if err != nil || e < start {
			return r, false, errIgnoreRange
		}
		end = min(e, size-1)
	}
	if start >= size {
		return r, false, nil
	}
	return byteRange{start, end - start + 1}, true, nil
}

// digits parses a non-negative decimal number (no sign, no spaces).
func digits(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, strconv.ErrSyntax
	}
	return strconv.ParseInt(s, 10, 64)
}
