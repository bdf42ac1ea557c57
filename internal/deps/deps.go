//go:build tools

// Package deps pins the modules the tree uses so helpers never race on go.mod.
package deps

import (
	_ "github.com/BurntSushi/toml"
	_ "github.com/containerd/containerd"
	_ "github.com/containerd/containerd/contrib/snapshotservice"
	_ "github.com/containerd/containerd/snapshots/overlay"
	_ "github.com/containerd/stargz-snapshotter/estargz"
	_ "github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	_ "github.com/google/go-containerregistry/pkg/authn"
	_ "github.com/google/go-containerregistry/pkg/v1/layout"
	_ "github.com/google/go-containerregistry/pkg/v1/remote"
	_ "github.com/hanwen/go-fuse/v2/fs"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/spf13/cobra"
	_ "github.com/vbauerster/mpb/v8"
	_ "go.etcd.io/bbolt"
	_ "golang.org/x/sync/errgroup"
	_ "golang.org/x/sys/unix"
	_ "golang.org/x/time/rate"
	_ "google.golang.org/grpc"
	_ "google.golang.org/protobuf/proto"
)
