// Package convert_test proves, against a real registry and containerd, that
// `starling convert` keeps every byte and attribute of an image, interoperates
// with the reference eStargz tools, and fails cleanly on bad input.
package convert_test

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/internal/treediff"
	"github.com/starling-dev/starling/pkg/registry"
)

func push(t *testing.T, ref string, img v1.Image) {
	t.Helper()
	c := registry.New(registry.DefaultConfig())
	r, err := c.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(context.Background(), r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// unpack pulls ref into containerd with its overlayfs snapshotter and
// records the tree containerd unpacked.
func unpack(t *testing.T, ctd *testenv.Containerd, ref string) treediff.Tree {
	t.Helper()
	ctx := context.Background()
	if out, err := ctd.Ctr(ctx, "image", "pull", "--plain-http", ref); err != nil {
		t.Fatalf("ctr pull %s: %v\n%s", ref, err, out)
	}
	dir := t.TempDir()
	if out, err := ctd.Ctr(ctx, "image", "mount", ref, dir); err != nil {
		t.Fatalf("ctr mount %s: %v\n%s", ref, err, out)
	}
	defer func() {
		if out, err := ctd.Ctr(ctx, "image", "unmount", "--rm", dir); err != nil {
			t.Errorf("ctr unmount %s: %v\n%s", dir, err, out)
		}
	}()
	tree, err := treediff.Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

func TestRoundTripHardCases(t *testing.T) {
	testenv.Require(t, "docker-registry", "containerd", "ctr")
	reg := testenv.StartRegistry(t)
	ctd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	starling := testenv.Bin(t, "starling")

	img, err := testimage.HardCases()
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Addr+"/hard:gz", reg.Addr+"/hard:esgz"
	push(t, src, img)
	testenv.Run(t, starling, "convert", "--chunk-size", "1048576", src, dst)

	orig := unpack(t, ctd, src)
	conv := unpack(t, ctd, dst)
	// eStargz keeps its TOC and prefetch landmark as ordinary tar entries,
	// so that the layer stays a valid tar for every runtime; a plain unpack
	// therefore shows them at the root (lazy mounts hide them). They are
	// the only difference allowed.
	for _, meta := range []string{"stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark"} {
		if n, ok := conv[meta]; ok && n.Type == "file" {
			delete(conv, meta)
		}
	}
	if d := treediff.Diff(orig, conv); len(d) > 0 {
		t.Fatalf("converted image unpacks differently (%d differences):\n%s", len(d), strings.Join(d, "\n"))
	}

	// The hard cases are really there, so equality means something.
	checks := map[string]func(treediff.Node, bool) bool{
		"data/remove-me":  func(_ treediff.Node, ok bool) bool { return !ok },
		"data/remove-dir": func(_ treediff.Node, ok bool) bool { return !ok },
		"opaque/old":      func(_ treediff.Node, ok bool) bool { return !ok },
		"opaque/olddir":   func(_ treediff.Node, ok bool) bool { return !ok },
		"opaque/new":      func(n treediff.Node, ok bool) bool { return ok && n.Type == "file" },
		"hlroot": func(n treediff.Node, ok bool) bool {
			return ok && n.LinkSet == "data/a/hl1|data/b/hl2|hlroot" && n.Nlink == 3
		},
		"dev/mychr":         func(n treediff.Node, ok bool) bool { return ok && n.Type == "char" && n.Rdev == "1:3" },
		"dev/myblk":         func(n treediff.Node, ok bool) bool { return ok && n.Type == "block" && n.Rdev == "7:0" },
		"dev/myfifo":        func(n treediff.Node, ok bool) bool { return ok && n.Type == "fifo" },
		"bin/suid":          func(n treediff.Node, ok bool) bool { return ok && n.Mode == 0o4755 },
		"tmp":               func(n treediff.Node, ok bool) bool { return ok && n.Mode == 0o1777 },
		"sgid-dir":          func(n treediff.Node, ok bool) bool { return ok && n.Mode == 0o2775 && n.GID == 50 },
		"data/nobody":       func(n treediff.Node, ok bool) bool { return ok && n.UID == 65534 && n.GID == 65534 },
		"bin/cap":           func(n treediff.Node, ok bool) bool { return ok && n.Xattrs["security.capability"] != "" },
		"data/xattr":        func(n treediff.Node, ok bool) bool { return ok && n.Xattrs["user.starling"] == "796573" },
		"data/rel":          func(n treediff.Node, ok bool) bool { return ok && n.Link == "../etc/hostname" },
		"data/empty":        func(n treediff.Node, ok bool) bool { return ok && n.Size == 0 },
		"data/big":          func(n treediff.Node, ok bool) bool { return ok && n.Size == 5<<20+123 },
		"café/日本語.txt":      func(n treediff.Node, ok bool) bool { return ok },
		"data/upper-hl/two": func(n treediff.Node, ok bool) bool { return ok && n.Nlink == 2 },
	}
	for p, check := range checks {
		n, ok := conv[p]
		if !check(n, ok) {
			t.Errorf("%s: unexpected %+v (present %v)", p, n, ok)
		}
	}
	var deep bool
	for p := range conv {
		if strings.HasSuffix(p, "/bottom") && strings.Count(p, "/") == 40 {
			deep = true
		}
	}
	if !deep {
		t.Error("the 40-level deep file is missing")
	}
}

type inspectJSON struct {
	Layers []struct {
		Format   string `json:"format"`
		TOCMatch *bool  `json:"toc_match"`
		Entries  int    `json:"entries"`
	} `json:"layers"`
}

// TestCtrRemoteInterop: an image converted by the reference converter is
// recognised by starling inspect as eStargz with a matching TOC digest.
func TestCtrRemoteInterop(t *testing.T) {
	testenv.Require(t, "docker-registry", "containerd", "ctr-remote")
	reg := testenv.StartRegistry(t)
	ctd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	starling := testenv.Bin(t, "starling")
	img, err := testimage.HardCases()
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Addr+"/interop:gz", reg.Addr+"/interop:ctr-remote"
	push(t, src, img)
	ctrRemote := func(args ...string) {
		t.Helper()
		testenv.Run(t, "ctr-remote", append([]string{"--address", ctd.Address}, args...)...)
	}
	ctrRemote("image", "pull", "--plain-http", src)
	ctrRemote("image", "optimize", "--no-optimize", "--oci", src, dst)
	ctrRemote("image", "push", "--plain-http", dst)

	var out inspectJSON
	if err := json.Unmarshal([]byte(testenv.Run(t, starling, "inspect", "-o", "json", dst)), &out); err != nil {
		t.Fatal(err)
	}
	if len(out.Layers) != 4 {
		t.Fatalf("%d layers", len(out.Layers))
	}
	for i, l := range out.Layers {
		if l.Format != "eStargz" || l.TOCMatch == nil || !*l.TOCMatch || l.Entries == 0 {
			t.Errorf("layer %d: %+v", i+1, l)
		}
	}
	// And the other way: containerd unpacks what we convert from ctr-remote's
	// output (its layers are kept as they are).
	testenv.Run(t, starling, "convert", dst, reg.Addr+"/interop:again")
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// runFail runs the starling binary expecting exit status 1 and one line of error.
func runFail(t *testing.T, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	if exitCode(err) != 1 {
		t.Fatalf("%v: exit %d, want 1; stderr:\n%s", args, exitCode(err), stderr.String())
	}
	msg := strings.TrimRight(stderr.String(), "\n")
	t.Logf("%v: %s", args, msg)
	if strings.Count(msg, "\n") != 0 || msg == "" {
		t.Fatalf("%v: want one line of error, got:\n%s", args, msg)
	}
	return msg
}

func blobDataPath(reg *testenv.Registry, h v1.Hash) string {
	return filepath.Join(reg.Dir, "data", "docker", "registry", "v2", "blobs", "sha256", h.Hex[:2], h.Hex, "data")
}
