/*
 * TEST TOOLING: a model of a network HSM. A PKCS#11 v2.40 module that forwards every
 * call to a target module (SoftHSM2 by default) after sleeping a fixed time, as a
 * client library of a network HSM waits on its round trip: the thread sleeps, the CPU
 * is free for others. Calls such a client library answers from its own cache (the
 * LOCAL_CALLS table below) are forwarded at once.
 *
 *   SAM_DELAY_PKCS11_TARGET        the module to forward to
 *                                  (default /usr/lib/softhsm/libsofthsm2.so)
 *   SAM_DELAY_PKCS11_MICROSECONDS  the delay per call (default 0)
 *
 * Both are read once, when C_GetFunctionList is first called; if the target cannot be
 * loaded, that call (and any other) returns CKR_GENERAL_ERROR and the reason goes to
 * stderr. After that the module's only state is read-only, so it is as thread-safe as
 * its target: C_Initialize hands the caller's arguments (CKF_OS_LOCKING_OK or its own
 * mutex functions) to the target unchanged. Built by sam_devtools/hsm_delay.py.
 */

#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"

/*
 * Every function of the v2.40 list but C_GetFunctionList (which returns this module's
 * own list), as X(name, parameters, arguments).
 *
 * LOCAL_CALLS: the exceptions, forwarded without the delay. A network HSM's client
 * library answers these from what it learnt when it connected (library, slot, token and
 * mechanism bookkeeping), or they set up / tear down the client itself.
 */
#define LOCAL_CALLS(X)                                                                  \
    X(C_Initialize, (CK_VOID_PTR init_args), (init_args))                               \
    X(C_Finalize, (CK_VOID_PTR reserved), (reserved))                                   \
    X(C_GetInfo, (CK_INFO_PTR info), (info))                                            \
    X(C_GetSlotList, (CK_BBOOL present, CK_SLOT_ID_PTR slots, CK_ULONG_PTR count),      \
      (present, slots, count))                                                          \
    X(C_GetSlotInfo, (CK_SLOT_ID slot, CK_SLOT_INFO_PTR info), (slot, info))            \
    X(C_GetTokenInfo, (CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info), (slot, info))          \
    X(C_GetMechanismList, (CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count), \
      (slot, list, count))                                                              \
    X(C_GetMechanismInfo, (CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info), \
      (slot, type, info))

/* NETWORK_CALLS: everything else, one round trip (one delay) each. */
#define NETWORK_CALLS(X)                                                                \
    X(C_WaitForSlotEvent, (CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved),  \
      (flags, slot, reserved))                                                          \
    X(C_InitToken, (CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR label), \
      (slot, pin, pin_len, label))                                                      \
    X(C_InitPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len), (s, pin, pin_len)) \
    X(C_SetPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len,        \
                 CK_UTF8CHAR_PTR new_pin, CK_ULONG new_len),                            \
      (s, old_pin, old_len, new_pin, new_len))                                          \
    X(C_OpenSession, (CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify, \
                      CK_SESSION_HANDLE_PTR s),                                         \
      (slot, flags, app, notify, s))                                                    \
    X(C_CloseSession, (CK_SESSION_HANDLE s), (s))                                       \
    X(C_CloseAllSessions, (CK_SLOT_ID slot), (slot))                                    \
    X(C_GetSessionInfo, (CK_SESSION_HANDLE s, CK_SESSION_INFO_PTR info), (s, info))     \
    X(C_GetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG_PTR state_len), \
      (s, state, state_len))                                                            \
    X(C_SetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG state_len, \
                            CK_OBJECT_HANDLE enc_key, CK_OBJECT_HANDLE auth_key),       \
      (s, state, state_len, enc_key, auth_key))                                         \
    X(C_Login, (CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len), \
      (s, user, pin, pin_len))                                                          \
    X(C_Logout, (CK_SESSION_HANDLE s), (s))                                             \
    X(C_CreateObject, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count,      \
                       CK_OBJECT_HANDLE_PTR obj),                                       \
      (s, tmpl, count, obj))                                                            \
    X(C_CopyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl,  \
                     CK_ULONG count, CK_OBJECT_HANDLE_PTR new_obj),                     \
      (s, obj, tmpl, count, new_obj))                                                   \
    X(C_DestroyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj), (s, obj))           \
    X(C_GetObjectSize, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ULONG_PTR size),  \
      (s, obj, size))                                                                   \
    X(C_GetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, \
                            CK_ULONG count),                                            \
      (s, obj, tmpl, count))                                                            \
    X(C_SetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, \
                            CK_ULONG count),                                            \
      (s, obj, tmpl, count))                                                            \
    X(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count),  \
      (s, tmpl, count))                                                                 \
    X(C_FindObjects, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR objs, CK_ULONG max,     \
                      CK_ULONG_PTR count),                                              \
      (s, objs, max, count))                                                            \
    X(C_FindObjectsFinal, (CK_SESSION_HANDLE s), (s))                                   \
    X(C_EncryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), \
      (s, mech, key))                                                                   \
    X(C_Encrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, \
                  CK_ULONG_PTR out_len),                                                \
      (s, in, in_len, out, out_len))                                                    \
    X(C_EncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, \
                        CK_ULONG_PTR out_len),                                          \
      (s, in, in_len, out, out_len))                                                    \
    X(C_EncryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),     \
      (s, out, out_len))                                                                \
    X(C_DecryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), \
      (s, mech, key))                                                                   \
    X(C_Decrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, \
                  CK_ULONG_PTR out_len),                                                \
      (s, in, in_len, out, out_len))                                                    \
    X(C_DecryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, \
                        CK_ULONG_PTR out_len),                                          \
      (s, in, in_len, out, out_len))                                                    \
    X(C_DecryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),     \
      (s, out, out_len))                                                                \
    X(C_DigestInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech), (s, mech))            \
    X(C_Digest, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, \
                 CK_ULONG_PTR out_len),                                                 \
      (s, in, in_len, out, out_len))                                                    \
    X(C_DigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len)) \
    X(C_DigestKey, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key), (s, key))               \
    X(C_DigestFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len),      \
      (s, out, out_len))                                                                \
    X(C_SignInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key),   \
      (s, mech, key))                                                                   \
    X(C_Sign, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR sig,   \
               CK_ULONG_PTR sig_len),                                                   \
      (s, in, in_len, sig, sig_len))                                                    \
    X(C_SignUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len)) \
    X(C_SignFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len),        \
      (s, sig, sig_len))                                                                \
    X(C_SignRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), \
      (s, mech, key))                                                                   \
    X(C_SignRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR sig, \
                      CK_ULONG_PTR sig_len),                                            \
      (s, in, in_len, sig, sig_len))                                                    \
    X(C_VerifyInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), \
      (s, mech, key))                                                                   \
    X(C_Verify, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR sig, \
                 CK_ULONG sig_len),                                                     \
      (s, in, in_len, sig, sig_len))                                                    \
    X(C_VerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len)) \
    X(C_VerifyFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG sig_len), (s, sig, sig_len)) \
    X(C_VerifyRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), \
      (s, mech, key))                                                                   \
    X(C_VerifyRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG sig_len, CK_BYTE_PTR out, \
                        CK_ULONG_PTR out_len),                                          \
      (s, sig, sig_len, out, out_len))                                                  \
    X(C_DigestEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,     \
                              CK_BYTE_PTR out, CK_ULONG_PTR out_len),                   \
      (s, in, in_len, out, out_len))                                                    \
    X(C_DecryptDigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,     \
                              CK_BYTE_PTR out, CK_ULONG_PTR out_len),                   \
      (s, in, in_len, out, out_len))                                                    \
    X(C_SignEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,       \
                            CK_BYTE_PTR out, CK_ULONG_PTR out_len),                     \
      (s, in, in_len, out, out_len))                                                    \
    X(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,     \
                              CK_BYTE_PTR out, CK_ULONG_PTR out_len),                   \
      (s, in, in_len, out, out_len))                                                    \
    X(C_GenerateKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_ATTRIBUTE_PTR tmpl, \
                      CK_ULONG count, CK_OBJECT_HANDLE_PTR key),                        \
      (s, mech, tmpl, count, key))                                                      \
    X(C_GenerateKeyPair, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech,                   \
                          CK_ATTRIBUTE_PTR pub_tmpl, CK_ULONG pub_count,                \
                          CK_ATTRIBUTE_PTR priv_tmpl, CK_ULONG priv_count,              \
                          CK_OBJECT_HANDLE_PTR pub, CK_OBJECT_HANDLE_PTR priv),         \
      (s, mech, pub_tmpl, pub_count, priv_tmpl, priv_count, pub, priv))                 \
    X(C_WrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE wrapping, \
                  CK_OBJECT_HANDLE key, CK_BYTE_PTR out, CK_ULONG_PTR out_len),         \
      (s, mech, wrapping, key, out, out_len))                                           \
    X(C_UnwrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE unwrapping, \
                    CK_BYTE_PTR in, CK_ULONG in_len, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, \
                    CK_OBJECT_HANDLE_PTR key),                                          \
      (s, mech, unwrapping, in, in_len, tmpl, count, key))                              \
    X(C_DeriveKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE base,  \
                    CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, CK_OBJECT_HANDLE_PTR key),   \
      (s, mech, base, tmpl, count, key))                                                \
    X(C_SeedRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR seed, CK_ULONG seed_len), (s, seed, seed_len)) \
    X(C_GenerateRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG out_len), (s, out, out_len)) \
    X(C_GetFunctionStatus, (CK_SESSION_HANDLE s), (s))                                  \
    X(C_CancelFunction, (CK_SESSION_HANDLE s), (s))

/* --- the one-time load: the only writes to this module's state --------------------- */

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST_PTR target; /* NULL: the target could not be loaded */
static struct timespec delay;

static void load(void)
{
    const char *path = getenv("SAM_DELAY_PKCS11_TARGET");
    const char *micros = getenv("SAM_DELAY_PKCS11_MICROSECONDS");
    unsigned long long us = 0;
    if (path == NULL || *path == '\0')
        path = DEFAULT_TARGET;
    if (micros != NULL && *micros != '\0') {
        char *end;
        errno = 0;
        us = strtoull(micros, &end, 10);
        if (errno != 0 || *end != '\0' || *micros == '-') {
            fprintf(stderr, "pkcs11_delay: SAM_DELAY_PKCS11_MICROSECONDS=%s is not a whole number\n",
                    micros);
            return;
        }
    }
    delay.tv_sec = (time_t)(us / 1000000);
    delay.tv_nsec = (long)(us % 1000000) * 1000;

    /* never closed: the target's function pointers must outlive any caller */
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        fprintf(stderr, "pkcs11_delay: cannot load the target module: %s\n", dlerror());
        return;
    }
    CK_C_GetFunctionList get_function_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR list = NULL;
    if (get_function_list == NULL) {
        fprintf(stderr, "pkcs11_delay: %s has no C_GetFunctionList\n", path);
        return;
    }
    CK_RV rv = get_function_list(&list);
    if (rv != CKR_OK || list == NULL) {
        fprintf(stderr, "pkcs11_delay: C_GetFunctionList of %s failed (0x%lx)\n", path, rv);
        return;
    }
    target = list;
}

/* pthread_once also orders every thread's later reads after load()'s writes */
static CK_FUNCTION_LIST_PTR loaded_target(void)
{
    pthread_once(&load_once, load);
    return target;
}

/* the round trip to the network HSM: the thread sleeps, the CPU is free */
static void round_trip(void)
{
    struct timespec left = delay;
    if (left.tv_sec == 0 && left.tv_nsec == 0)
        return;
    while (nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
}

/* --- the forwarding functions, generated from the tables --------------------------- */

#define FORWARD(name, params, args, before)                                            \
    static CK_RV forward_##name params                                                  \
    {                                                                                   \
        CK_FUNCTION_LIST_PTR t = loaded_target();                                       \
        if (t == NULL)                                                                  \
            return CKR_GENERAL_ERROR;                                                   \
        if (t->name == NULL)                                                            \
            return CKR_FUNCTION_NOT_SUPPORTED;                                          \
        before;                                                                         \
        return t->name args;                                                            \
    }
#define FORWARD_LOCAL(name, params, args) FORWARD(name, params, args, (void)0)
#define FORWARD_NETWORK(name, params, args) FORWARD(name, params, args, round_trip())

LOCAL_CALLS(FORWARD_LOCAL)
NETWORK_CALLS(FORWARD_NETWORK)

#define LIST_ENTRY(name, params, args) .name = forward_##name,
#define COUNT(name, params, args) +1

static const CK_FUNCTION_LIST function_list = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
    .C_GetFunctionList = C_GetFunctionList,
    LOCAL_CALLS(LIST_ENTRY) NETWORK_CALLS(LIST_ENTRY)
};

/* the tables name every function of the list exactly once: a name twice would define
   its forwarding function twice, and this refuses a name missing */
_Static_assert(1 LOCAL_CALLS(COUNT) NETWORK_CALLS(COUNT) ==
                   (sizeof(CK_FUNCTION_LIST) - offsetof(CK_FUNCTION_LIST, C_Initialize)) /
                       sizeof(CK_C_Initialize),
               "LOCAL_CALLS and NETWORK_CALLS must cover the whole CK_FUNCTION_LIST");

/* --- the one exported symbol ------------------------------------------------------- */

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    if (loaded_target() == NULL)
        return CKR_GENERAL_ERROR;
    /* the list is never written: callers only read it (the cast drops const for the ABI) */
    *list = (CK_FUNCTION_LIST_PTR)&function_list;
    return CKR_OK;
}
