// Centrifuge peer for benches/rooms.py: a WebSocket server on the Centrifuge library (Go,
// Debian's golang-github-centrifugal-centrifuge-dev, v0.15), doing what our backend does with
// rooms: server-side joins and leaves of a connection to channels, presence queries and
// publishing to a channel. The benchmark's driver calls them as RPCs over its own control
// WebSocket (Centrifuge's JSON protocol, method 9), the way our backend sends commands to our
// broker.
//
// RPC methods (data is JSON):
//
//	join     {"c": client id, "ch": channel}  Client.Subscribe(ch) + PresenceManager.AddPresence
//	leave    {"c": client id, "ch": channel}  Client.Unsubscribe(ch) + PresenceManager.RemovePresence
//	members  {"ch": channel}                  Node.Presence(ch): reply {"members": [client ids]}
//	count    {"ch": channel}                  Node.PresenceStats(ch): reply {"count": n}
//	publish  {"ch": channel, "d": any JSON}   Node.Publish(ch, d)
//
// Centrifuge 0.15's server-side Client.Subscribe acts on a connection of this node only and
// does not register presence (only subscriptions made at connect time or by the client get the
// Presence option), so join/leave add and remove the presence entry themselves, as the library
// does internally for presence-enabled subscriptions. Every connection is accepted with its
// client id as user id.
//
// History and recovery (benches/recovery.py, issue 17): with -history-size N (> 0) every
// `publish` keeps the publication in the channel's history (WithHistory(N, -history-ttl); in
// memory, or with -redis in a Redis Stream per channel, UseStreams, stream meta kept
// -history-meta-ttl), and with -recover a client may subscribe to any channel itself
// (OnSubscribe answers SubscribeOptions{Recover: true}): its subscribe reply carries the
// channel's offset and epoch, and a subscribe with `recover`, `offset` and `epoch` after a
// reconnect gets the missed publications in the reply (`recovered: true`). Without -recover a
// client's own subscribe is allowed with no options.
//
// Usage: centrifuge-peer -port 8000 [-redis 127.0.0.1:6379] [-history-size 100 -history-ttl 300s
// -history-meta-ttl 86400s -recover] (Redis: broker and presence in Redis, so several nodes form
// a cluster; without: in-memory, one node).
// Build (offline, Debian's Go 1.19 and library source):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o centrifuge-peer .
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/centrifugal/centrifuge"
)

type server struct {
	node        *centrifuge.Node
	publishOpts []centrifuge.PublishOption
	pm          centrifuge.PresenceManager
	mu          sync.RWMutex
	// connections of this node by client id, with the channels joined through `join`
	clients map[string]*entry
}

type entry struct {
	client   *centrifuge.Client
	mu       sync.Mutex
	channels map[string]struct{}
}

type ctlArgs struct {
	C  string          `json:"c"`
	Ch string          `json:"ch"`
	D  json.RawMessage `json:"d"`
}

var errUnknownClient = errors.New("unknown client")

func (s *server) lookup(id string) *entry {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.clients[id]
}

func (s *server) rpc(e centrifuge.RPCEvent) ([]byte, error) {
	var a ctlArgs
	if err := json.Unmarshal(e.Data, &a); err != nil {
		return nil, err
	}
	switch e.Method {
	case "join":
		en := s.lookup(a.C)
		if en == nil {
			return nil, errUnknownClient
		}
		en.mu.Lock()
		defer en.mu.Unlock()
		if _, ok := en.channels[a.Ch]; ok {
			return []byte(`{}`), nil
		}
		if err := en.client.Subscribe(a.Ch); err != nil {
			return nil, err
		}
		en.channels[a.Ch] = struct{}{}
		info := &centrifuge.ClientInfo{ClientID: en.client.ID(), UserID: en.client.UserID()}
		if err := s.pm.AddPresence(a.Ch, en.client.ID(), info); err != nil {
			return nil, err
		}
		return []byte(`{}`), nil
	case "leave":
		en := s.lookup(a.C)
		if en == nil {
			return nil, errUnknownClient
		}
		en.mu.Lock()
		defer en.mu.Unlock()
		if _, ok := en.channels[a.Ch]; !ok {
			return []byte(`{}`), nil
		}
		delete(en.channels, a.Ch)
		if err := en.client.Unsubscribe(a.Ch); err != nil {
			return nil, err
		}
		if err := s.pm.RemovePresence(a.Ch, en.client.ID()); err != nil {
			return nil, err
		}
		return []byte(`{}`), nil
	case "members":
		res, err := s.node.Presence(a.Ch)
		if err != nil {
			return nil, err
		}
		ids := make([]string, 0, len(res.Presence))
		for id := range res.Presence {
			ids = append(ids, id)
		}
		return json.Marshal(map[string]interface{}{"members": ids})
	case "count":
		res, err := s.node.PresenceStats(a.Ch)
		if err != nil {
			return nil, err
		}
		return json.Marshal(map[string]int{"count": res.NumClients})
	case "publish":
		if _, err := s.node.Publish(a.Ch, a.D, s.publishOpts...); err != nil {
			return nil, err
		}
		return []byte(`{}`), nil
	}
	return nil, errors.New("unknown method " + e.Method)
}

func main() {
	port := flag.String("port", "8000", "WebSocket port (on 127.0.0.1)")
	redisAddr := flag.String("redis", "", "Redis host:port for a cluster (broker + presence); empty: in memory")
	historySize := flag.Int("history-size", 0, "publications kept per channel (0: no history)")
	historyTTL := flag.Duration("history-ttl", 300*time.Second, "how long a channel's history is kept")
	historyMetaTTL := flag.Duration("history-meta-ttl", 86400*time.Second, "how long a channel's stream position is kept (Redis)")
	recoverOn := flag.Bool("recover", false, "clients' own subscriptions get SubscribeOptions{Recover: true}")
	flag.Parse()

	cfg := centrifuge.DefaultConfig
	cfg.LogLevel = centrifuge.LogLevelError
	cfg.LogHandler = func(e centrifuge.LogEntry) { log.Printf("%s: %v", e.Message, e.Fields) }
	cfg.ClientChannelLimit = 1024
	node, err := centrifuge.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	s := &server{node: node, clients: map[string]*entry{}}
	if *historySize > 0 {
		s.publishOpts = append(s.publishOpts, centrifuge.WithHistory(*historySize, *historyTTL))
	}

	if *redisAddr != "" {
		shard, err := centrifuge.NewRedisShard(node, centrifuge.RedisShardConfig{Address: *redisAddr})
		if err != nil {
			log.Fatal(err)
		}
		broker, err := centrifuge.NewRedisBroker(node, centrifuge.RedisBrokerConfig{
			Shards:         []*centrifuge.RedisShard{shard},
			UseStreams:     true,
			HistoryMetaTTL: *historyMetaTTL,
		})
		if err != nil {
			log.Fatal(err)
		}
		node.SetBroker(broker)
		pm, err := centrifuge.NewRedisPresenceManager(node, centrifuge.RedisPresenceManagerConfig{Shards: []*centrifuge.RedisShard{shard}})
		if err != nil {
			log.Fatal(err)
		}
		node.SetPresenceManager(pm)
		s.pm = pm
	} else {
		pm, err := centrifuge.NewMemoryPresenceManager(node, centrifuge.MemoryPresenceManagerConfig{})
		if err != nil {
			log.Fatal(err)
		}
		node.SetPresenceManager(pm)
		s.pm = pm
	}

	node.OnConnecting(func(ctx context.Context, e centrifuge.ConnectEvent) (centrifuge.ConnectReply, error) {
		return centrifuge.ConnectReply{Credentials: &centrifuge.Credentials{UserID: e.ClientID}}, nil
	})
	node.OnConnect(func(c *centrifuge.Client) {
		en := &entry{client: c, channels: map[string]struct{}{}}
		s.mu.Lock()
		s.clients[c.ID()] = en
		s.mu.Unlock()
		c.OnDisconnect(func(e centrifuge.DisconnectEvent) {
			s.mu.Lock()
			delete(s.clients, c.ID())
			s.mu.Unlock()
			en.mu.Lock()
			for ch := range en.channels {
				_ = s.pm.RemovePresence(ch, c.ID())
			}
			en.channels = map[string]struct{}{}
			en.mu.Unlock()
		})
		c.OnSubscribe(func(e centrifuge.SubscribeEvent, cb centrifuge.SubscribeCallback) {
			cb(centrifuge.SubscribeReply{Options: centrifuge.SubscribeOptions{Recover: *recoverOn}}, nil)
		})
		c.OnRPC(func(e centrifuge.RPCEvent, cb centrifuge.RPCCallback) {
			data, err := s.rpc(e)
			if err != nil {
				cb(centrifuge.RPCReply{}, &centrifuge.Error{Code: 400, Message: err.Error()})
				return
			}
			cb(centrifuge.RPCReply{Data: data}, nil)
		})
	})
	if err := node.Run(); err != nil {
		log.Fatal(err)
	}

	http.Handle("/connection/websocket", centrifuge.NewWebsocketHandler(node, centrifuge.WebsocketConfig{}))
	srv := &http.Server{Addr: "127.0.0.1:" + *port}
	go func() {
		if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	// No node.Shutdown: it disconnects every client one by one; the benchmark is done with them.
	_ = srv.Close()
}
