package toc

import (
	"errors"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
)

func TestValidate(t *testing.T) {
	ok := &estargz.JTOC{Entries: []*estargz.TOCEntry{{Name: "a/b", Type: "reg"}, {Name: "a/..b", Type: "reg"}, {Name: "c", Type: "hardlink", LinkName: "a/b"}}}
	if err := Validate(ok); err != nil {
		t.Fatalf("valid TOC refused: %v", err)
	}
	for _, e := range []*estargz.TOCEntry{
		{Name: "../x", Type: "reg"},
		{Name: "a/../../x", Type: "dir"},
		{Name: "/etc/passwd", Type: "reg"},
		{Name: "l", Type: "hardlink", LinkName: "../../etc/shadow"},
		{Name: "l", Type: "hardlink", LinkName: "/etc/shadow"},
	} {
		err := Validate(&estargz.JTOC{Entries: []*estargz.TOCEntry{{Name: "fine", Type: "reg"}, e}})
		if !errors.Is(err, ErrEscapes) {
			t.Errorf("%q -> %q accepted: %v", e.Name, e.LinkName, err)
		}
	}
}
