package piece

import "testing"

func TestPieceMaths(t *testing.T) {
	const s = 4
	if Count(0, s) != 0 || Count(1, s) != 1 || Count(4, s) != 1 || Count(5, s) != 2 || Count(12, s) != 3 {
		t.Fatal("Count")
	}
	if off, l := Range(2, 10, s); off != 8 || l != 2 {
		t.Fatalf("last piece %d+%d", off, l)
	}
	if off, l := Range(0, 10, s); off != 0 || l != 4 {
		t.Fatalf("first piece %d+%d", off, l)
	}
	cases := []struct {
		off, n, length int64
		first, last    int
		ok             bool
	}{
		{0, 1, 10, 0, 0, true},
		{3, 2, 10, 0, 1, true},
		{4, 4, 10, 1, 1, true},
		{9, 100, 10, 2, 2, true},
		{10, 1, 10, 0, 0, false},
		{0, 0, 10, 0, 0, false},
	}
	for _, c := range cases {
		f, l, ok := Covering(c.off, c.n, c.length, s)
		if f != c.first || l != c.last || ok != c.ok {
			t.Errorf("Covering(%d,%d,%d) = %d,%d,%v", c.off, c.n, c.length, f, l, ok)
		}
	}
}

func TestSizeFor(t *testing.T) {
	for _, c := range []struct{ length, want int64 }{
		{0, 1 << 20}, {1, 1 << 20}, {128 << 20, 1 << 20}, {128<<20 + 1, 2 << 20},
		{256 << 20, 2 << 20}, {1 << 30, 8 << 20}, {2 << 30, 16 << 20}, {10 << 30, 16 << 20},
	} {
		if got := SizeFor(c.length); got != c.want {
			t.Errorf("SizeFor(%d) = %d, want %d", c.length, got, c.want)
		}
	}
}
