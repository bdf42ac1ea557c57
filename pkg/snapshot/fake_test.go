package snapshot

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync"

	"github.com/containerd/containerd/pkg/snapshotters"
)

// fakeFS is a FileSystem that "mounts" a layer by writing a marker file
// into the mountpoint, so a test can see what is mounted where.
type fakeFS struct {
	mu       sync.Mutex
	mounted  map[string]map[string]string // mountpoint -> labels
	mounts   int
	unmounts int
	checks   int
	// failMount fails Mount of a layer digest.
	failMount map[string]error
	// failCheck fails Check of a mountpoint.
	failCheck map[string]error
	// reading holds a lock per mountpoint for reads in flight: Unmount
	// waits for them, like a FUSE unmount of a busy layer.
	reading map[string]*sync.RWMutex
	// unmountStarted is told when an Unmount starts waiting for reads.
	unmountStarted chan string
}

func newFakeFS() *fakeFS {
	return &fakeFS{
		mounted:   map[string]map[string]string{},
		failMount: map[string]error{},
		failCheck: map[string]error{},
		reading:   map[string]*sync.RWMutex{},
	}
}

const marker = "mounted-by-fake"

func (f *fakeFS) Mount(ctx context.Context, dir string, labels map[string]string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	ld := labels[snapshotters.TargetLayerDigestLabel]
	if err := f.failMount[ld]; err != nil {
		return err
	}
	if _, ok := f.mounted[dir]; ok {
		return fmt.Errorf("%s already mounted", dir)
	}
	if err := os.WriteFile(filepath.Join(dir, marker), []byte(ld), 0o644); err != nil {
		return err
	}
	f.mounted[dir] = maps.Clone(labels)
	f.mounts++
	return nil
}

func (f *fakeFS) Check(ctx context.Context, dir string, labels map[string]string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.checks++
	if err := f.failCheck[dir]; err != nil {
		return err
	}
	if _, ok := f.mounted[dir]; !ok {
		return errors.New("not mounted")
	}
	return nil
}

func (f *fakeFS) Unmount(ctx context.Context, dir string) error {
	f.mu.Lock()
	rw := f.reading[dir]
	started := f.unmountStarted
	f.mu.Unlock()
	if rw != nil {
		if started != nil {
			started <- dir
		}
		// Waits for the reads in flight: the empty section is the point.
		rw.Lock()
		//lint:ignore SA2001 see above
		rw.Unlock()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounted[dir]; !ok {
		return nil
	}
	delete(f.mounted, dir)
	f.unmounts++
	return os.Remove(filepath.Join(dir, marker))
}

// startRead begins a read of the layer at dir; the returned func ends it.
func (f *fakeFS) startRead(dir string) func() {
	f.mu.Lock()
	rw := f.reading[dir]
	if rw == nil {
		rw = &sync.RWMutex{}
		f.reading[dir] = rw
	}
	f.mu.Unlock()
	rw.RLock()
	return rw.RUnlock
}

func (f *fakeFS) isMounted(dir string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.mounted[dir]
	return ok
}

func (f *fakeFS) count() (mounts, unmounts, checks int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mounts, f.unmounts, f.checks
}

func (f *fakeFS) setFailMount(layer string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.failMount, layer)
	} else {
		f.failMount[layer] = err
	}
}

func (f *fakeFS) setFailCheck(dir string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.failCheck, dir)
	} else {
		f.failCheck[dir] = err
	}
}

// resolvingFS is a fakeFS that also implements Resolver.
type resolvingFS struct {
	*fakeFS
	mu       sync.Mutex
	refuse   map[string]error // layer digest -> error
	resolved []string
}

func (r *resolvingFS) Resolve(ctx context.Context, labels map[string]string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	ld := labels[snapshotters.TargetLayerDigestLabel]
	r.resolved = append(r.resolved, ld)
	return r.refuse[ld]
}
