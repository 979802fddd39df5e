#include "xmlin.h"

#include <expat.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct xmlin {
    XML_Parser p;
    xmlin_start_fn on_start;
    xmlin_end_fn on_end;
    void *ud;
    int depth;
};

static void on_start(void *ud, const XML_Char *name, const XML_Char **attrs)
{
    xmlin_t *x = ud;
    x->on_start(x->ud, x->depth++, name, attrs);
}

static void on_end(void *ud, const XML_Char *name)
{
    xmlin_t *x = ud;
    x->on_end(x->ud, --x->depth, name);
}

static void setup(xmlin_t *x)
{
    XML_SetUserData(x->p, x);
    XML_SetElementHandler(x->p, on_start, on_end);
    x->depth = 0;
}

xmlin_t *xmlin_new(xmlin_start_fn start, xmlin_end_fn end, void *ud)
{
    xmlin_t *x = calloc(1, sizeof *x);
    if (!x || !(x->p = XML_ParserCreate(NULL))) {
        free(x);
        return NULL;
    }
    x->on_start = start;
    x->on_end = end;
    x->ud = ud;
    setup(x);
    return x;
}

int xmlin_feed(xmlin_t *x, const char *data, size_t len)
{
    if (XML_Parse(x->p, data, (int)len, 0) == XML_STATUS_OK)
        return 0;
    fprintf(stderr, "xmlin: %s at line %lu\n", XML_ErrorString(XML_GetErrorCode(x->p)),
            (unsigned long)XML_GetCurrentLineNumber(x->p));
    return -1;
}

void xmlin_reset(xmlin_t *x)
{
    XML_ParserReset(x->p, NULL);
    setup(x);
}

void xmlin_free(xmlin_t *x)
{
    if (x) {
        XML_ParserFree(x->p);
        free(x);
    }
}

const char *xmlin_attr(const char **attrs, const char *name)
{
    for (; attrs && attrs[0]; attrs += 2)
        if (strcmp(attrs[0], name) == 0)
            return attrs[1];
    return NULL;
}
