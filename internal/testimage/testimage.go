// Package testimage builds the images starling's tests run against, in Go,
// deterministically: a "hard cases" image whose layers hold everything a
// layer format and a snapshotter get wrong, and large images of random data.
package testimage

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Epoch is the modification time of every entry, so builds are reproducible.
var Epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Entry is one tar entry of a layer.
type Entry struct {
	Name     string
	Type     byte // tar.TypeReg, TypeDir, TypeSymlink, TypeLink, TypeChar, TypeBlock, TypeFifo
	Mode     int64
	UID, GID int
	Data     []byte
	Link     string
	Major    int64
	Minor    int64
	Xattrs   map[string]string
}

// Layer is a list of entries written in order. A hardlink entry carries the
// mode and owner of its target, as tar(1) writes them: unpackers apply a
// hardlink header's metadata to the shared inode.
type Layer []Entry

// Tar writes the layer as an uncompressed tar.
func (l Layer) Tar() ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range l {
		h := &tar.Header{
			Name:     e.Name,
			Typeflag: e.Type,
			Mode:     e.Mode,
			Uid:      e.UID,
			Gid:      e.GID,
			Linkname: e.Link,
			Devmajor: e.Major,
			Devminor: e.Minor,
			ModTime:  Epoch,
			Format:   tar.FormatPAX,
		}
		if e.Type == tar.TypeReg {
			h.Size = int64(len(e.Data))
		}
		if len(e.Xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.Xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if e.Type == tar.TypeReg {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Image assembles layers into an OCI image for this host's architecture,
// with gzip layers, running /bin/sh by default.
func Image(layers ...Layer) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, l := range layers {
		b, err := l.Tar()
		if err != nil {
			return nil, err
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(b)), nil
		}, tarball.WithMediaType(types.OCILayer))
		if err != nil {
			return nil, err
		}
		if img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: "testimage"}}); err != nil {
			return nil, err
		}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = v1.Time{Time: Epoch}
	cfg.Config.Cmd = []string{"/bin/sh"}
	cfg.Config.Env = []string{"PATH=/bin"}
	return mutate.ConfigFile(img, cfg)
}

// Random returns n bytes of deterministic pseudo-random data.
func Random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := n - n%8; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// BusyboxLayer holds the host's static busybox as /bin/busybox with /bin/sh
// and a few applets linked to it, so that containers can run from the image.
func BusyboxLayer() (Layer, error) {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return nil, err
	}
	l := Layer{
		{Name: "bin/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Type: tar.TypeReg, Mode: 0o755, Data: bb},
	}
	for _, app := range []string{"sh", "cat", "ls", "sha256sum", "echo", "head", "wc", "sleep", "find", "stat"} {
		l = append(l, Entry{Name: "bin/" + app, Type: tar.TypeSymlink, Mode: 0o777, Link: "busybox"})
	}
	return l, nil
}

// capability is a VFS_CAP_REVISION_2 security.capability value granting
// CAP_NET_BIND_SERVICE, effective.
func capability() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|0x1)
	binary.LittleEndian.PutUint32(b[4:], 1<<10)
	return string(b)
}

// HardCases returns the hard-case image: three layers over busybox holding
// hardlinks across directories, symlinks of every kind, an empty file, files
// larger than several chunks, a whiteout and an opaque directory, device
// nodes and a fifo, setuid, setgid and sticky bits, owners other than root,
// xattrs including security.capability, long and non-ASCII names and a deep path.
func HardCases() (v1.Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return nil, err
	}
	long := strings.Repeat("L", 250) + ".long"
	deep := ""
	for i := 0; i < 40; i++ {
		deep += "d" + string(rune('a'+i%26)) + "/"
	}
	base := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/hostname", Type: tar.TypeReg, Mode: 0o644, Data: []byte("lower\n")},
		{Name: "data/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/a/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/b/", Type: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000},
		{Name: "data/a/hl1", Type: tar.TypeReg, Mode: 0o640, UID: 1000, GID: 100, Data: []byte("linked content\n")},
		{Name: "data/b/hl2", Type: tar.TypeLink, Mode: 0o640, UID: 1000, GID: 100, Link: "data/a/hl1"},
		{Name: "hlroot", Type: tar.TypeLink, Mode: 0o640, UID: 1000, GID: 100, Link: "data/a/hl1"},
		{Name: "data/empty", Type: tar.TypeReg, Mode: 0o644},
		{Name: "data/big", Type: tar.TypeReg, Mode: 0o644, Data: Random(1, 5<<20+123)},
		{Name: "data/medium1", Type: tar.TypeReg, Mode: 0o600, Data: Random(2, 300_000)},
		{Name: "data/medium2", Type: tar.TypeReg, Mode: 0o444, Data: bytes.Repeat([]byte("compressible "), 40_000)},
		{Name: "data/rel", Type: tar.TypeSymlink, Mode: 0o777, Link: "../etc/hostname"},
		{Name: "data/abs", Type: tar.TypeSymlink, Mode: 0o777, Link: "/etc/hostname"},
		{Name: "data/dangling", Type: tar.TypeSymlink, Mode: 0o777, Link: "/does/not/exist"},
		{Name: "data/dirlink", Type: tar.TypeSymlink, Mode: 0o777, Link: "a"},
		{Name: "data/owned", Type: tar.TypeReg, Mode: 0o644, UID: 1000, GID: 1000, Data: []byte("owned by 1000\n")},
		{Name: "data/nobody", Type: tar.TypeReg, Mode: 0o600, UID: 65534, GID: 65534, Data: []byte("nobody\n")},
		{Name: "data/xattr", Type: tar.TypeReg, Mode: 0o644, Data: []byte("has xattrs\n"), Xattrs: map[string]string{"user.starling": "yes", "user.empty": ""}},
		{Name: "data/" + long, Type: tar.TypeReg, Mode: 0o644, Data: []byte("long name\n")},
		{Name: "data/remove-me", Type: tar.TypeReg, Mode: 0o644, Data: []byte("to be whited out\n")},
		{Name: "data/remove-dir/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/remove-dir/inside", Type: tar.TypeReg, Mode: 0o644, Data: []byte("gone\n")},
		{Name: "bin/cap", Type: tar.TypeReg, Mode: 0o755, Data: []byte("#!/bin/sh\necho cap\n"), Xattrs: map[string]string{"security.capability": capability()}},
		{Name: "bin/suid", Type: tar.TypeReg, Mode: 0o4755, Data: []byte("setuid\n")},
		{Name: "bin/sgid", Type: tar.TypeReg, Mode: 0o2755, UID: 0, GID: 50, Data: []byte("setgid\n")},
		{Name: "sgid-dir/", Type: tar.TypeDir, Mode: 0o2775, GID: 50},
		{Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "dev/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "dev/mychr", Type: tar.TypeChar, Mode: 0o666, Major: 1, Minor: 3},
		{Name: "dev/myblk", Type: tar.TypeBlock, Mode: 0o660, GID: 6, Major: 7, Minor: 0},
		{Name: "dev/myfifo", Type: tar.TypeFifo, Mode: 0o644},
		{Name: "opaque/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "opaque/old", Type: tar.TypeReg, Mode: 0o644, Data: []byte("hidden by the opaque upper\n")},
		{Name: "opaque/olddir/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "opaque/olddir/f", Type: tar.TypeReg, Mode: 0o644, Data: []byte("hidden too\n")},
		{Name: "café/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "café/日本語.txt", Type: tar.TypeReg, Mode: 0o644, Data: []byte("こんにちは\n")},
		{Name: "café/ünïcödé-ñame", Type: tar.TypeSymlink, Mode: 0o777, Link: "日本語.txt"},
	}
	dir := ""
	for _, part := range strings.Split(strings.TrimSuffix(deep, "/"), "/") {
		dir += part + "/"
		base = append(base, Entry{Name: dir, Type: tar.TypeDir, Mode: 0o755})
	}
	base = append(base, Entry{Name: dir + "bottom", Type: tar.TypeReg, Mode: 0o644, Data: []byte("deep\n")})

	upper := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/hostname", Type: tar.TypeReg, Mode: 0o644, Data: []byte("upper\n")},
		{Name: "data/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/.wh.remove-me", Type: tar.TypeReg, Mode: 0o644},
		{Name: "data/.wh.remove-dir", Type: tar.TypeReg, Mode: 0o644},
		{Name: "opaque/", Type: tar.TypeDir, Mode: 0o711},
		{Name: "opaque/.wh..wh..opq", Type: tar.TypeReg, Mode: 0o644},
		{Name: "opaque/new", Type: tar.TypeReg, Mode: 0o644, Data: []byte("the only file left\n")},
		{Name: "café/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "café/upper-ß", Type: tar.TypeReg, Mode: 0o644, UID: 42, GID: 42, Data: []byte("upper layer\n")},
		{Name: "data/upper-hl/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "data/upper-hl/one", Type: tar.TypeReg, Mode: 0o644, Data: Random(3, 70_000)},
		{Name: "data/upper-hl/two", Type: tar.TypeLink, Mode: 0o644, Link: "data/upper-hl/one"},
	}
	top := Layer{
		{Name: "etc/", Type: tar.TypeDir, Mode: 0o755},
		{Name: "etc/layer3", Type: tar.TypeReg, Mode: 0o644, Data: []byte("third\n")},
		{Name: "private/", Type: tar.TypeDir, Mode: 0o700, UID: 1000, GID: 1000},
		{Name: "private/secret", Type: tar.TypeReg, Mode: 0o400, UID: 1000, GID: 1000, Data: []byte("s3cret\n")},
	}
	return Image(bb, base, upper, top)
}

// Large returns busybox plus one layer of about size bytes of random data
// spread over files files (named /large/fNNNN), and a few small files in
// /small for workloads that read little.
func Large(size int64, files int) (v1.Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return nil, err
	}
	if files < 1 {
		files = 1
	}
	per := int(size / int64(files))
	l := Layer{{Name: "large/", Type: tar.TypeDir, Mode: 0o755}, {Name: "small/", Type: tar.TypeDir, Mode: 0o755}}
	for i := 0; i < files; i++ {
		l = append(l, Entry{Name: "large/f" + pad4(i), Type: tar.TypeReg, Mode: 0o644, Data: Random(uint64(100+i), per)})
		if i%8 == 0 {
			l = append(l, Entry{Name: "small/s" + pad4(i), Type: tar.TypeReg, Mode: 0o644, Data: []byte("small file " + pad4(i) + "\n")})
		}
	}
	return Image(bb, l)
}

func pad4(i int) string { return fmt.Sprintf("%04d", i) }
