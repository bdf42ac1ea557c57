// Package lazy_test runs images lazily end to end: Debian's containerd and
// runc, a real registry behind a counting proxy, FUSE, and starlingd as
// containerd's remote snapshotter.
package lazy_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/starling-dev/starling/internal/testenv"
	"github.com/starling-dev/starling/pkg/registry"
)

// stack is one node: registry (behind a counting proxy), containerd and starlingd.
type stack struct {
	t        *testing.T
	reg      *testenv.Registry
	proxy    *testenv.CountingProxy
	ctd      *testenv.Containerd
	sd       *testenv.Proc
	sdArgs   []string
	root     string
	sock     string
	starling string
}

// newStack starts everything; config is starlingd's TOML (may be empty).
func newStack(t *testing.T, config string) *stack {
	t.Helper()
	testenv.Require(t, "docker-registry", "containerd", "runc", "ctr", "fusermount3")
	s := &stack{t: t, starling: testenv.Bin(t, "starling")}
	s.reg = testenv.StartRegistry(t)
	s.proxy = testenv.StartCountingProxy(t, s.reg.Addr)
	dir, err := os.MkdirTemp("/tmp", "sd")
	if err != nil {
		t.Fatal(err)
	}
	s.root, s.sock = filepath.Join(dir, "root"), filepath.Join(dir, "sd.sock")
	cfg := filepath.Join(dir, "starlingd.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	s.sdArgs = []string{"--config", cfg, "--root", s.root, "--address", s.sock,
		"--metrics-listen", "", "--health-listen", "", "--peer=false", "--log-level", "debug"}
	s.startDaemon()
	s.ctd = testenv.StartContainerd(t, testenv.ContainerdOptions{ProxySnapshotters: map[string]string{"starling": s.sock}})
	t.Cleanup(func() {
		s.sd.Stop()
		testenv.UnmountUnder(dir)
		_ = os.RemoveAll(dir)
	})
	return s
}

func (s *stack) startDaemon() {
	s.t.Helper()
	s.sd = testenv.Start(s.t, "starlingd", nil, testenv.Bin(s.t, "starlingd"), s.sdArgs...)
	testenv.WaitFor(s.t, 20*time.Second, "starlingd socket", func() bool {
		if s.sd.Exited() {
			s.t.Fatalf("starlingd exited:\n%s", s.sd.Log())
		}
		_, err := os.Stat(s.sock)
		return err == nil
	})
}

// push stores img in the registry; the returned reference goes through the proxy.
func (s *stack) push(repoTag string, img v1.Image) string {
	s.t.Helper()
	c := registry.New(registry.DefaultConfig())
	r, err := c.ParseReference(s.reg.Addr + "/" + repoTag)
	if err != nil {
		s.t.Fatal(err)
	}
	if err := c.Write(context.Background(), r, img); err != nil {
		s.t.Fatal(err)
	}
	return s.proxy.Addr + "/" + repoTag
}

func (s *stack) run(args ...string) string {
	s.t.Helper()
	return testenv.Run(s.t, s.starling, args...)
}

// pull runs `starling pull` against this stack's containerd.
func (s *stack) pull(ref string) string {
	s.t.Helper()
	return s.run("pull", "--address", s.ctd.Address, ref)
}

// ctrRun runs a container from ref with the starling snapshotter.
func (s *stack) ctrRun(ref string, cmd ...string) (string, error) {
	s.t.Helper()
	id := "c" + strings.ReplaceAll(time.Now().Format("150405.000000"), ".", "")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return s.ctd.Ctr(ctx, append([]string{"run", "--rm", "--snapshotter", "starling", ref, id}, cmd...)...)
}

// layerDigests lists the layer digests of a manifest in the registry.
func (s *stack) layers(ref string) []v1.Descriptor {
	s.t.Helper()
	c := registry.New(registry.DefaultConfig())
	r, _ := c.ParseReference(strings.Replace(ref, s.proxy.Addr, s.reg.Addr, 1))
	img, err := c.Image(context.Background(), r, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		s.t.Fatal(err)
	}
	return m.Layers
}

// chainID is the snapshot key of ref's top layer.
func chainID(t *testing.T, s *stack, ref string) string {
	t.Helper()
	c := registry.New(registry.DefaultConfig())
	r, _ := c.ParseReference(strings.Replace(ref, s.proxy.Addr, s.reg.Addr, 1))
	img, err := c.Image(context.Background(), r, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	var ids []digest.Digest
	for _, d := range cfg.RootFS.DiffIDs {
		ids = append(ids, digest.Digest(d.String()))
	}
	return identity.ChainID(ids).String()
}

// converted pushes img as REPO:gz and its `starling convert` as REPO:esgz;
// both references go through the counting proxy.
func (s *stack) converted(repo string, img v1.Image) (gz, esgz string) {
	s.t.Helper()
	gz = s.push(repo+":gz", img)
	esgz = s.proxy.Addr + "/" + repo + ":esgz"
	s.run("convert", gz, esgz)
	return gz, esgz
}

// must fails the test on an error from building an image.
func must(t *testing.T) func(v1.Image, error) v1.Image {
	return func(img v1.Image, err error) v1.Image {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
}
