# procpool: build, test and tooling. `make help` lists the targets.

LUA        ?= lua5.4
LUA_PC     ?= lua5.4
CC         ?= cc
PREFIX     ?= /usr/local
LUA_VER    := 5.4
LUA_CFLAGS := $(shell pkg-config --cflags $(LUA_PC) 2>/dev/null || echo -I/usr/include/lua5.4)
BUSTED     ?= busted --lua=$(LUA)
TIMEOUT    ?= 280

WARN   = -Wall -Wextra -Wshadow -Wundef -Wmissing-prototypes -Wstrict-prototypes \
         -Wwrite-strings -Wno-unused-parameter
CSTD   = -std=c99
OPT   ?= -O2 -g -fno-plt
CFLAGS_ALL = $(CSTD) $(OPT) -fPIC -fvisibility=hidden $(WARN) $(LUA_CFLAGS) $(CFLAGS)
LDLIBS_ALL = -lpthread -ldl $(LDLIBS)

SRCS := $(sort $(wildcard src/*.c))
HDRS := $(wildcard src/*.h)
LUA_MODS := $(wildcard lua/procpool/*.lua)

BUILD ?= build
OBJS   = $(SRCS:src/%.c=$(BUILD)/obj/%.o)
SO     = $(BUILD)/procpool/core.so

.PHONY: all test check ctest asan valgrind fuzz bench format format-check lint clean deps \
        demo install uninstall embed stress help

all: $(SO)

$(BUILD)/obj/%.o: src/%.c $(HDRS) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(SO): $(OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(CFLAGS_ALL) -o $@ $(OBJS) $(LDFLAGS) $(LDLIBS_ALL)

# --- tests ---------------------------------------------------------------

CTESTS := $(patsubst spec/c/%.c,$(BUILD)/ctest/%,$(wildcard spec/c/test_*.c))
# The engine's test links the engine's files alone, without Lua: the build
# itself says that the engine never needs a lua_State.
ENGINE_SRCS := src/engine.c src/channel.c src/buf.c src/forkgate.c src/warm.c

$(BUILD)/ctest/test_engine: spec/c/test_engine.c $(ENGINE_SRCS) $(HDRS) spec/c/ctest.h
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(OPT) $(WARN) -Isrc $(CFLAGS) -o $@ $< $(ENGINE_SRCS) $(LDFLAGS) -lpthread

$(BUILD)/ctest/%: spec/c/%.c $(SRCS) $(HDRS) spec/c/ctest.h
	@mkdir -p $(dir $@)
	$(CC) $(CSTD) $(OPT) $(WARN) -Isrc $(LUA_CFLAGS) $(CFLAGS) -o $@ $< \
	  $(SRCS) $(LDFLAGS) $(shell pkg-config --libs $(LUA_PC) 2>/dev/null || echo -llua5.4) -lm -lpthread -ldl

ctest: $(CTESTS)

test: all $(CTESTS) $(BUILD)/embed/host
	@LUA="$(LUA)" BUSTED="$(BUSTED)" BUILD="$(BUILD)" TIMEOUT="$(TIMEOUT)" \
	  sh spec/run.sh $(CTESTS)

check: test

# ASan + UBSan: the module is instrumented, the interpreter is not, so the
# sanitizer runtime is preloaded.
ASAN_FLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
asan:
	$(MAKE) BUILD=build-asan OPT="-O1 -g $(ASAN_FLAGS)" LDFLAGS="$(ASAN_FLAGS)" all ctest
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:handle_segv=0:handle_abort=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	PROCPOOL_SANITIZED=1 LUA="$(LUA)" BUSTED="$(BUSTED)" BUILD=build-asan TIMEOUT=600 \
	  sh spec/run.sh $(patsubst spec/c/%.c,build-asan/ctest/%,$(wildcard spec/c/test_*.c))

VALGRIND = valgrind -q --error-exitcode=99 --leak-check=no --track-fds=no \
           --suppressions=spec/valgrind.supp
valgrind: all $(CTESTS)
	PROCPOOL_SANITIZED=1 LUA="$(VALGRIND) $(LUA)" BUSTED="$(VALGRIND) $(LUA) /usr/bin/busted" \
	  BUILD="$(BUILD)" TIMEOUT=1500 CTEST_WRAP="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite" \
	  sh spec/run.sh $(CTESTS)

# libFuzzer on the decoder; FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
fuzz: $(BUILD)/fuzz_decode
	@mkdir -p $(BUILD)/fuzz-corpus
	$(BUILD)/fuzz_decode -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=10 \
	  -rss_limit_mb=2048 -print_final_stats=1 $(BUILD)/fuzz-corpus spec/fuzz/corpus

$(BUILD)/fuzz_decode: spec/fuzz/fuzz_decode.c $(SRCS) $(HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined -DPP_FUZZ_NO_FINALIZERS -Isrc $(LUA_CFLAGS) -o $@ \
	  spec/fuzz/fuzz_decode.c $(SRCS) \
	  $(shell pkg-config --libs $(LUA_PC) 2>/dev/null || echo -llua5.4) -lm -lpthread

bench: all
	@sh bench/run.sh

# a million tasks under random worker kills; every future accounted for
stress: all
	@$(LUA_ENV) LUA_PATH="./?.lua;lua/?.lua;lua/?/init.lua;;" $(LUA) bench/stress.lua

format:
	clang-format -i $(SRCS) $(HDRS) spec/c/*.c spec/c/*.h spec/fuzz/*.c

format-check:
	clang-format --dry-run --Werror $(SRCS) $(HDRS) spec/c/*.c spec/c/*.h spec/fuzz/*.c

lint:
	cppcheck --quiet --force --error-exitcode=1 --enable=warning,performance,portability \
	  --suppress=missingIncludeSystem -Isrc $(LUA_CFLAGS) src
	@if command -v luacheck >/dev/null; then luacheck -q lua spec bench examples bin/procpool; \
	  else echo "luacheck not installed; skipped"; fi

# --- install, demo, embedding -----------------------------------------------

INSTALL_LMOD = $(PREFIX)/share/lua/$(LUA_VER)
INSTALL_CMOD = $(PREFIX)/lib/lua/$(LUA_VER)

install: all
	install -d $(DESTDIR)$(INSTALL_CMOD)/procpool $(DESTDIR)$(INSTALL_LMOD)/procpool \
	  $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(SO) $(DESTDIR)$(INSTALL_CMOD)/procpool/core.so
	install -m 644 $(LUA_MODS) $(DESTDIR)$(INSTALL_LMOD)/procpool/
	install -m 755 bin/procpool $(DESTDIR)$(PREFIX)/bin/procpool

uninstall:
	rm -f $(DESTDIR)$(INSTALL_CMOD)/procpool/core.so $(DESTDIR)$(PREFIX)/bin/procpool
	rm -f $(addprefix $(DESTDIR)$(INSTALL_LMOD)/procpool/,$(notdir $(LUA_MODS)))
	-rmdir $(DESTDIR)$(INSTALL_CMOD)/procpool $(DESTDIR)$(INSTALL_LMOD)/procpool 2>/dev/null

LUA_ENV = LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='$(BUILD)/?.so;;'

demo: all
	@$(LUA_ENV) $(LUA) examples/demo.lua

# the embedding example, built as a user would: with pkg-config
$(BUILD)/embed/host: examples/embed/host.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -o $@ $< $$(pkg-config --cflags --libs $(LUA_PC)) -lpthread

embed: $(BUILD)/embed/host

clean:
	rm -rf build build-asan examples/embed/host

# Debian packages needed to build, test and run the examples.
DEB_PKGS = $(shell grep -v '^\#' .ci/packages)
deps:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $(DEB_PKGS)

help:
	@echo "make            build $(SO)"
	@echo "make test       C tests + busted specs; ends with 'N passed, M failed'"
	@echo "make asan       the same under ASan+UBSan"
	@echo "make valgrind   the same under valgrind"
	@echo "make fuzz       libFuzzer on the decoder (FUZZ_SECONDS=$(FUZZ_SECONDS))"
	@echo "make bench      benchmarks beside Python's pools (BENCHES=...)"
	@echo "make stress     1e6 tasks under random worker kills"
	@echo "make deps       apt-get the Debian packages"
	@echo "make demo       build and run a parallel demonstration"
	@echo "make install    PREFIX=$(PREFIX) (and make uninstall)"
