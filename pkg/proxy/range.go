package proxy

import (
	"errors"
	"strconv"
	"strings"
)

var (
	// errUnsatisfiable is a range that starts past the end (answered 416).
	errUnsatisfiable = errors.New("range not satisfiable")
	// errIgnoreRange is a Range header answered with the whole blob:
	// several ranges, another unit, or one we cannot parse.
	errIgnoreRange = errors.New("range ignored")
)

// parseRange returns the one byte range (RFC 9110 14.1.2) that spec asks
// for in a blob of size bytes.
func parseRange(spec string, size int64) (off, n int64, err error) {
	unit, set, ok := strings.Cut(spec, "=")
	if !ok || !strings.EqualFold(strings.TrimSpace(unit), "bytes") {
		return 0, 0, errIgnoreRange
	}
	set = strings.TrimSpace(set)
	if strings.Contains(set, ",") {
		return 0, 0, errIgnoreRange
	}
	first, last, ok := strings.Cut(set, "-")
	if !ok {
		return 0, 0, errIgnoreRange
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	if first == "" {
		// A suffix: the last N bytes.
		suffix, err := digits(last)
		if err != nil {
			return 0, 0, errIgnoreRange
		}
		if suffix == 0 || size == 0 {
			return 0, 0, errUnsatisfiable
		}
		suffix = min(suffix, size)
		return size - suffix, suffix, nil
	}
	start, err := digits(first)
	if err != nil {
		return 0, 0, errIgnoreRange
	}
	end := size - 1
	if last != "" {
		e, err := digits(last)
		if err != nil || e < start {
			return 0, 0, errIgnoreRange
		}
		end = min(e, size-1)
	}
	if start >= size {
		return 0, 0, errUnsatisfiable
	}
	return start, end - start + 1, nil
}

// digits parses a non-negative decimal number (no sign, no spaces).
func digits(s string) (int64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, strconv.ErrSyntax
	}
	return strconv.ParseInt(s, 10, 64)
}
