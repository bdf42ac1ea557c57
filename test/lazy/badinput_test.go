package lazy_test

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/starling-dev/starling/internal/testimage"
	"github.com/starling-dev/starling/pkg/registry"
)

// rawManifest is a manifest put back as edited bytes.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.b, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

// TestTOCDigestMismatch: a layer whose TOC does not match its annotation is
// not mounted lazily; it falls back to download and unpack, with a warning
// naming the layer, and the container still runs.
func TestTOCDigestMismatch(t *testing.T) {
	s := newStack(t, "")
	_, esgz := s.converted("hard", must(t)(testimage.HardCases()))

	// Lie about the top layer's TOC digest in the manifest.
	c := registry.New(registry.DefaultConfig())
	direct, _ := c.ParseReference(strings.Replace(esgz, s.proxy.Addr, s.reg.Addr, 1))
	d, err := c.Get(context.Background(), direct)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(d.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	layers := m["layers"].([]any)
	top := layers[len(layers)-1].(map[string]any)
	top["annotations"].(map[string]any)["containerd.io/snapshot/stargz/toc.digest"] = "sha256:" + strings.Repeat("0", 64)
	b, _ := json.Marshal(m)
	bad, _ := c.ParseReference(s.reg.Addr + "/hard:badtoc")
	if err := remote.Put(bad, rawManifest{b, d.MediaType}); err != nil {
		t.Fatal(err)
	}
	ref := s.proxy.Addr + "/hard:badtoc"
	out := s.pull(ref)
	if !strings.Contains(out, "3 of 4 layers lazy") {
		t.Fatalf("pull: %s", out)
	}
	log := s.sd.Log()
	topDigest := top["digest"].(string)
	if !strings.Contains(log, "falls back") || !strings.Contains(log, topDigest) || !strings.Contains(log, "TOC does not match") {
		t.Fatalf("no fallback warning naming the layer:\n%s", log)
	}
	if got, err := s.ctrRun(ref, "/bin/cat", "/etc/layer3"); err != nil || got != "third\n" {
		t.Fatalf("run: %v %q", err, got)
	}
}

// TestEscapingEntryRefused: a TOC entry named ../x makes the layer refuse to
// mount, with an error naming the entry.
func TestEscapingEntryRefused(t *testing.T) {
	s := newStack(t, "")
	bb, err := testimage.BusyboxLayer()
	if err != nil {
		t.Fatal(err)
	}
	evil := testimage.Layer{{Name: "../escape", Type: tar.TypeReg, Mode: 0o644, Data: []byte("out\n")}, {Name: "fine", Type: tar.TypeReg, Mode: 0o644, Data: []byte("in\n")}}
	img, err := testimage.Image(bb, evil)
	if err != nil {
		t.Fatal(err)
	}
	_, esgz := s.converted("evil", img)
	out := s.pull(esgz)
	if !strings.Contains(out, "1 of 2 layers lazy") {
		t.Fatalf("pull: %s", out)
	}
	log := s.sd.Log()
	if !strings.Contains(log, `TOC entry \"../escape\"`) || !strings.Contains(log, "resolves outside the layer") {
		t.Fatalf("no refusal naming the entry:\n%s", log)
	}
}

// TestRegistryStopsMidRead: a registry that stops answering in the middle
// of a read gives the reader an I/O error within the timeouts, never a
// hang; the daemon keeps serving, and the same read works once the
// registry is back.
func TestRegistryStopsMidRead(t *testing.T) {
	s := newStack(t, noFetchAhead+"fetch_timeout = \"5s\"\n[resolver]\nrequest_timeout = \"2s\"\nretries = 1\n")
	_, esgz := s.converted("large", must(t)(testimage.Large(20<<20, 20)))
	s.pull(esgz)
	// busybox itself must be there before the registry dies.
	if out, err := s.ctrRun(esgz, "/bin/cat", "/small/s0000"); err != nil {
		t.Fatalf("warm-up: %v %q", err, out)
	}

	s.proxy.Stall()
	start := time.Now()
	out, err := s.ctrRun(esgz, "/bin/cat", "/large/f0001")
	took := time.Since(start)
	if err == nil {
		t.Fatalf("read through a dead registry succeeded: %d bytes", len(out))
	}
	if !strings.Contains(strings.ToLower(out), "input/output error") {
		t.Fatalf("want an I/O error, got %v: %q", err, out)
	}
	t.Logf("read failed after %s: %s", took.Round(time.Millisecond), strings.TrimSpace(out))
	// Not a timing assertion: a hang would take the test's whole timeout.
	if took > 4*5*time.Second {
		t.Fatalf("the read failed only after %s; fetch_timeout is 5s", took)
	}
	var failLine string
	for _, l := range strings.Split(s.sd.Log(), "\n") {
		if strings.Contains(l, "chunk fetch failed") {
			failLine = l
		}
	}
	if !strings.Contains(failLine, "layer=sha256:") || !strings.Contains(failLine, "chunk=sha256:") {
		t.Fatalf("no log line naming the layer and chunk of the failed read:\n%s", s.sd.Log())
	}
	// What is local keeps being served while the registry is down.
	if out, err := s.ctrRun(esgz, "/bin/cat", "/small/s0000"); err != nil {
		t.Fatalf("a local file failed while the registry was down: %v %q", err, out)
	}

	s.proxy.Resume()
	time.Sleep(time.Second) // a chunk that just failed fails at once for 500 ms
	// The check runs inside the container: a megabyte through ctr's
	// stdout can lose its tail on a loaded machine, which says nothing
	// about the file.
	want := sha256.Sum256(testimage.Random(101, (20<<20)/20))
	got, err := s.ctrRun(esgz, "/bin/sha256sum", "/large/f0001")
	if err != nil || !strings.HasPrefix(got, hex.EncodeToString(want[:])) {
		t.Fatalf("after the registry came back: %v, %q", err, got)
	}
}
